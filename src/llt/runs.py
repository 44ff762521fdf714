"""Run directories: naming, atomic writes, manifest, JSON-lines records, stage markers, checkpoints, summary.

A run directory is `OUT_DIR/<slug>-<hash>`, the hash taken over the full resolved config except the
output folder itself (so changing any value, a default included, can never silently reuse a stale run,
while a run directory moved to another folder is still recognised). It holds:

    manifest.json     config, versions, device, seeds, dataset and pool provenance, the stream
    config.yaml       the resolved config (re-loadable with --preset)
    records.jsonl     one JSON object per event (time stamped)
    stream.pt         the stream's index sets (torch.load(weights_only=True))
    stages/<name>.done  written last when a stage finishes; a rerun skips finished stages
    .lock, lock       the OS lock of the process using the directory, and its owner (see RunLock)
    summary.json      when a run ends: method, dataset, num_tasks, seed, accuracy matrix, SA, ...

Every file goes through llt.storage (temporary name, fsync, rename), so a crash never leaves a truncated
file under the final name.
"""

from __future__ import annotations

import errno
import fcntl
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

import torch

from llt import __version__, storage
from llt.config import RunConfig, dump_yaml, to_tree
from llt.errors import LLTError
from llt.metrics import summarize

FORMAT_VERSION = 2   # 2: stage metadata hold densities in [0, 1]; OS-level run lock
SUMMARY_KEYS = ("method", "dataset", "num_tasks", "seed", "accuracy_matrix", "sa", "remaining_weights", "forgetting")


# Config fields that say how a run is carried out, not what it computes: left out of the run's identity.
# The data's location is one of them: a run keeps its name when the data move. On resume the stream check
# (class order, split and exemplar index hashes) still refuses a different stream; the pixels themselves
# are not hashed there.
OPERATIONAL_FIELDS = ("out_dir", "checkpoint_every")
DATA_LOCATION_FIELDS = ("data_dir", "cache_dir", "download")


def identity_tree(cfg_tree: dict) -> dict:
    """A config tree without its operational fields (section run) and data location (section data)."""
    tree = json.loads(json.dumps(cfg_tree))
    for section, keys in (("run", OPERATIONAL_FIELDS), ("data", DATA_LOCATION_FIELDS)):
        for k in keys:
            tree.get(section, {}).pop(k, None)
    return tree


def config_hash(cfg: RunConfig) -> str:
    """Hash of every config value except the operational ones (run.out_dir, the folder that holds the run,
    run.checkpoint_every, and where the data are read from): a run directory moved to another output folder
    or machine keeps its identity, and a run can be continued with another checkpoint interval."""
    tree = identity_tree(to_tree(cfg))
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]


def run_name(cfg: RunConfig, preset: str | None = None) -> str:
    base = cfg.run.name or "-".join(x for x in (Path(preset).stem if preset else "", cfg.run.method,
                                                cfg.data.dataset, f"s{cfg.run.seed}") if x)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "run"
    return f"{slug}-{config_hash(cfg)}"


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
        storage.atomic_write_json(self.file(name), obj)

    def write_text(self, name: str, text: str) -> None:
        storage.atomic_write_bytes(self.file(name), text.encode())

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
        return RunLock(self.path)

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
    """Exclusive use of a run directory through an OS lock: fcntl.flock on `<run>/.lock`.

    The kernel releases the lock when its process ends in any way (exit, Ctrl-C, SIGKILL, a crash), so there
    is no stale lock to guess at and no window in which two processes that both found one could both take
    it. The owner (host, pid, command, since) is written to `<run>/lock` once the lock is held and removed
    when it is released; it only serves the message a second process prints. A `lock` file left by a
    process that died is noted and replaced. The lock file `.lock` itself stays (removing a locked file
    would let a third process lock a new file of the same name).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.lock_path, self.owner_path = self.folder / ".lock", self.folder / "lock"
        self._fd: int | None = None

    def owner(self) -> dict:
        try:
            obj = json.loads(self.owner_path.read_text())
            return obj if isinstance(obj, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}

    @staticmethod
    def describe(owner: dict) -> str:
        if not owner:
            return "another process"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
        return (f"process {owner.get('pid')} on host {owner.get('host')} (since {since}: "
                f"{str(owner.get('command', ''))[:120]})")

    def __enter__(self) -> "RunLock":
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LLTError(f"cannot lock {self.folder}: {e.strerror or e}") from None
            owner = {}
            for _ in range(40):         # the holder writes its note just after taking the lock; until then
                note = self.owner()     # the note may still be that of a dead earlier owner
                if note and (note.get("host") != platform.node() or _alive(note.get("pid"))):
                    owner = note
                    break
                time.sleep(0.05)
            raise LLTError(f"{self.folder} is in use by {self.describe(owner)}; wait for it to finish or "
                           f"stop it") from None
        self._fd = fd
        try:
            previous = self.owner()
            if previous:
                print(f"[llt] note: taking over {self.folder.name} from {self.describe(previous)}, which stopped "
                      f"without releasing it", file=sys.stderr)
            storage.atomic_write_json(self.owner_path, {"host": platform.node(), "pid": os.getpid(),
                                                "since": round(time.time(), 3), "command": " ".join(sys.argv)})
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc) -> None:
        try:
            if self.owner().get("pid") == os.getpid():
                self.owner_path.unlink(missing_ok=True)
        finally:
            self._release()


def _alive(pid) -> bool:
    """Whether process `pid` exists on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_held(folder: Path) -> bool:
    """True when a process holds the run directory's lock now (tried without taking it)."""
    path = Path(folder) / ".lock"
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def build_summary(method: str, dataset: str, seed: int, accuracy_matrix, densities, **extra) -> dict:
    """summary.json content: identity, the accuracy matrix (test, percent, R[t][i] for i <= t) and metrics.
    `densities` (kept fraction of the conv weights after each task, in [0, 1]) are also given as
    `remaining_weights` in percent, the figure the paper reports."""
    R = [[round(float(v), 4) for v in row] for row in accuracy_matrix]
    m = summarize(R)
    if len(densities) != len(R):
        raise ValueError("densities needs one value per task")
    return {"format_version": FORMAT_VERSION, "method": method, "dataset": dataset, "num_tasks": len(R),
            "seed": seed, "accuracy_matrix": R, "sa": m["sa"], "density": [float(d) for d in densities],
            "remaining_weights": [100.0 * float(d) for d in densities],
            "forgetting": m["forgetting"], "average_incremental_accuracy": m["average_incremental_accuracy"],
            "backward_transfer": m["backward_transfer"], "final_sa": m["sa"][-1],
            "final_forgetting": m["forgetting"][-1], "learning_accuracy": m["learning_accuracy"],
            "mean_learning_accuracy": m["mean_learning_accuracy"],
            "mean_learning_accuracy_incremental": m["mean_learning_accuracy_incremental"], **extra}


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
    if "learning_accuracy" not in obj:       # written before learning accuracy was recorded: derived from R
        try:
            m = summarize(R)
        except (TypeError, ValueError) as e:
            raise LLTError(f"{source}: accuracy_matrix must hold numbers ({e})") from None
        obj = {**obj, **{k: m[k] for k in ("learning_accuracy", "mean_learning_accuracy",
                                           "mean_learning_accuracy_incremental")}}
    return obj
