"""Atomic file writes and weights-only checkpoints: the one way llt puts anything on disk.

Every file is written to a temporary name in the same folder, fsynced, renamed over its final name, and
the folder is fsynced, so a crash never leaves a truncated file under the final name. Checkpoints are
{'state': tensors, 'meta': JSON text}, read back only through llt.safeload's bounded reader: reading one never
runs code, and allocates no more than the file's own bytes (within --max-bytes). This module sits below everything else in llt (data, pruning, runs import it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from llt.errors import LLTError


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


def _process_umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing with writer threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


_UMASK = _process_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`; it is fsynced and renamed over `path`, then the
    folder is fsynced. On any failure the temporary is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)       # what open() would give (mkstemp makes 0600)
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
    """Write `data` to `path` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_torch_save(path: str | Path, obj) -> None:
    """torch.save `obj` to `path` atomically.

    torch.save writes a file path from C++ without holding Python's GIL for the data, unlike saving into
    an in-memory buffer first: a background writer (llt.checkpointing) then barely slows the training
    thread, and no second copy of a large checkpoint is made in host memory."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def atomic_save_npz(path: str | Path, **arrays) -> None:
    """An uncompressed .npz written atomically (through the same temporary-fsync-rename as every file)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:     # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, **arrays)

    atomic_write(path, write)


def save_checkpoint(path: str | Path, state_dict: dict, meta: dict | None = None) -> None:
    """A checkpoint is {'state': tensors, 'meta': JSON text}: what llt.safeload.load_file accepts."""
    atomic_torch_save(path, {"state": state_dict, "meta": json.dumps(meta or {})})


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, meta) of a checkpoint written by save_checkpoint, tensors on the CPU, read by the one
    bounded reader (llt.safeload.load_file); LLTError of one line for a missing, damaged or hostile file."""
    from llt import safeload

    path = Path(path)
    if not path.is_file():
        raise LLTError(f"missing checkpoint {path}")
    try:
        obj = safeload.load_file(path)
    except LLTError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise LLTError(f"{path}: not a valid llt checkpoint ({reason})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state"), dict) or not isinstance(obj.get("meta"), str) \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj["state"].items()):
        raise LLTError(f"{path}: not an llt checkpoint (expected a dict of tensors 'state' and JSON text 'meta')")
    try:
        meta = json.loads(obj["meta"])
    except (ValueError, RecursionError):
        raise LLTError(f"{path}: not an llt checkpoint (its 'meta' is not JSON)") from None
    if not isinstance(meta, dict):
        raise LLTError(f"{path}: not an llt checkpoint (its 'meta' is not a JSON object)")
    return obj["state"], meta
