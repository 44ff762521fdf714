"""Run directories: naming, atomic writes, manifest, JSON-lines records, stage markers, checkpoints, summary.

A run directory is `OUT_DIR/<slug>-<hash>`, the hash taken over the full resolved config except the
output folder itself (so changing any value, a default included, can never silently reuse a stale run,
while a run directory moved to another folder is still recognised). It holds:

    manifest.json     config, versions, device, seeds, dataset and pool provenance, the stream
    config.yaml       the resolved config (re-loadable with --preset)
    records.jsonl     one JSON object per event (time stamped)
    stream.pt         the stream's index sets (torch.load(weights_only=True))
    stages/<name>.done  written last when a stage finishes; a rerun skips finished stages
    summary.json      when a run ends: method, dataset, num_tasks, seed, accuracy matrix, SA, ...

Every file is written to a temporary name in the same folder, flushed to disk, then renamed, so a crash
never leaves a truncated file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from llt import __version__
from llt.config import RunConfig, dump_yaml, to_tree
from llt.errors import LLTError
from llt.metrics import summarize

FORMAT_VERSION = 1
SUMMARY_KEYS = ("method", "dataset", "num_tasks", "seed", "accuracy_matrix", "sa", "remaining_weights", "forgetting")


# Config fields that say how a run is carried out, not what it computes: left out of the run's identity.
OPERATIONAL_FIELDS = ("out_dir", "checkpoint_every")


def config_hash(cfg: RunConfig) -> str:
    """Hash of every config value except the operational ones (run.out_dir, the folder that holds the run,
    and run.checkpoint_every): a run directory moved to another output folder keeps its identity, and a
    run can be continued with another checkpoint interval."""
    tree = to_tree(cfg)
    tree["run"] = {k: v for k, v in tree["run"].items() if k not in OPERATIONAL_FIELDS}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]


def run_name(cfg: RunConfig, preset: str | None = None) -> str:
    base = cfg.run.name or "-".join(x for x in (Path(preset).stem if preset else "", cfg.run.method,
                                                cfg.data.dataset, f"s{cfg.run.seed}") if x)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "run"
    return f"{slug}-{config_hash(cfg)}"


# ------------------------------------------------------------------------------------------ atomic I/O

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`; it is fsynced and renamed over `path`, then the
    folder is fsynced. On any failure the temporary is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temporary file, fsync, rename, fsync of the folder."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(path, write)


def atomic_torch_save(path: str | Path, obj) -> None:
    """torch.save `obj` to `path` atomically (temporary file, fsync, rename, fsync of the folder).

    torch.save writes a file path from C++ without holding Python's GIL for the data, unlike saving into
    an in-memory buffer first: a background writer (llt.checkpointing) then barely slows the training
    thread, and no second copy of a large checkpoint is made in host memory."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def save_checkpoint(path: str | Path, state_dict: dict, meta: dict | None = None) -> None:
    """A checkpoint is {'state': tensors, 'meta': JSON text}: loadable with torch.load(weights_only=True)."""
    atomic_torch_save(path, {"state": state_dict, "meta": json.dumps(meta or {})})


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[dict, dict]:
    """(state_dict, meta) of a checkpoint written by save_checkpoint; never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise LLTError(f"missing checkpoint {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or malicious files
        raise LLTError(f"{path}: not a valid llt checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict) or "state" not in obj or "meta" not in obj:
        raise LLTError(f"{path}: not an llt checkpoint (expected keys 'state' and 'meta')")
    return obj["state"], json.loads(obj["meta"])


# ------------------------------------------------------------------------------------------ run folder

def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    return {
        "llt_version": __version__,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def ensure_writable(out_dir: str | Path) -> Path:
    """Create `out_dir` if needed and prove it writable; raise LLTError otherwise."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".llt-write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LLTError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    return out


class RunDir:
    """One run's folder. Creating it checks that the output folder is writable."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, out_dir: str | Path, name: str) -> "RunDir":
        path = ensure_writable(out_dir) / name
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise LLTError(f"cannot create the run directory {path}: {e.strerror or e}") from None
        return cls(path)

    # files
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.file(name), obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.file(name), text.encode())

    def record(self, event: str, **fields) -> None:
        """Append one JSON line to records.jsonl (a single write of one line). A line torn by a crash is
        closed first, so the records written after it stay readable."""
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, allow_nan=False) + "\n"
        path = self.file("records.jsonl")
        with open(path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        """Every readable record; a line torn by a crash is skipped."""
        return read_records(self.file("records.jsonl"))

    # lock
    def lock(self) -> "RunLock":
        """Exclusive use of this run directory (a context manager); see RunLock."""
        return RunLock(self.file("lock"))

    # stages
    def stage_done(self, stage: str) -> bool:
        return self.file(f"stages/{stage}.done").is_file()

    def mark_done(self, stage: str, **info) -> None:
        """Write the stage's marker; the epoch checkpoints of the training it contained are no longer needed
        (a method finishes the stage of each training before it starts another)."""
        self.write_json(f"stages/{stage}.done", {"stage": stage, "time": round(time.time(), 3), **info})
        shutil.rmtree(self.file("checkpoints/epoch"), ignore_errors=True)

    def write_manifest(self, cfg: RunConfig, preset: str | None, **sections) -> None:
        self.write_json("manifest.json", {"format_version": FORMAT_VERSION, "preset": preset,
                                          "config_hash": config_hash(cfg), "config": to_tree(cfg),
                                          "environment": environment(), **sections})
        self.write_text("config.yaml", dump_yaml(cfg))


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a records.jsonl file, skipping lines torn by a crash (and anything not an object)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


class RunLock:
    """A lock file holding the owner's host and pid, created with O_EXCL.

    A second process that finds a lock whose owner is alive on this host stops with a clear error; a lock
    whose owner is gone (a crash, SIGKILL) is stale and taken over, with a note. Released on exit.
    """

    def __init__(self, path: Path):
        self.path = path

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __enter__(self) -> "RunLock":
        me = {"host": platform.node(), "pid": os.getpid(), "since": round(time.time(), 3)}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                same_host = owner.get("host") == me["host"]
                if same_host and isinstance(owner.get("pid"), int) and self._alive(owner["pid"]):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
                    raise LLTError(f"{self.path.parent} is in use by process {owner['pid']} (since {since}); "
                                   f"wait for it to finish or stop it") from None
                if not same_host and owner:
                    raise LLTError(f"{self.path.parent} is locked by process {owner.get('pid')} on host "
                                   f"{owner.get('host')}; if that run is gone, delete {self.path}") from None
                print(f"[llt] note: removing a stale lock of process {owner.get('pid')} (no longer running)",
                      file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            return self
        raise LLTError(f"could not lock {self.path.parent}")

    def __exit__(self, *exc) -> None:
        if self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def build_summary(method: str, dataset: str, seed: int, accuracy_matrix, remaining_weights, **extra) -> dict:
    """summary.json content: identity, the accuracy matrix (test, percent, R[t][i] for i <= t) and metrics."""
    R = [[round(float(v), 4) for v in row] for row in accuracy_matrix]
    m = summarize(R)
    if len(remaining_weights) != len(R):
        raise ValueError("remaining_weights needs one value per task")
    return {"format_version": FORMAT_VERSION, "method": method, "dataset": dataset, "num_tasks": len(R),
            "seed": seed, "accuracy_matrix": R, "sa": m["sa"], "remaining_weights": [float(x) for x in remaining_weights],
            "forgetting": m["forgetting"], "average_incremental_accuracy": m["average_incremental_accuracy"],
            "backward_transfer": m["backward_transfer"], "final_sa": m["sa"][-1],
            "final_forgetting": m["forgetting"][-1], **extra}


def check_summary(obj, source: str) -> dict:
    """Validate a summary.json object read from disk; raise LLTError naming what is wrong."""
    if not isinstance(obj, dict):
        raise LLTError(f"{source}: summary must be a JSON object")
    missing = [k for k in SUMMARY_KEYS if k not in obj]
    if missing:
        raise LLTError(f"{source}: not an llt summary (missing {', '.join(missing)})")
    R = obj["accuracy_matrix"]
    if not isinstance(R, list) or len(R) != obj["num_tasks"] or any(
            not isinstance(row, list) or len(row) != t + 1 for t, row in enumerate(R)):
        raise LLTError(f"{source}: accuracy_matrix must have num_tasks rows, row t holding t+1 values")
    return obj
