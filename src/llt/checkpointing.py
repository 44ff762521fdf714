"""Epoch checkpoints: resume a training from its last finished epoch instead of the start of its stage.

Stages (llt.runs) keep what a run has *finished*; an epoch checkpoint keeps the state of the one training
in progress, so that an interruption (SIGKILL, a lost machine, a full disk) costs at most the epochs since
the last checkpoint. It holds everything the rest of the training reads:

    model           state_dict after the epoch (masked weights are zero in it)
    optimizer       SGD state_dict (momentum buffers); the learning rate is a function of the epoch
                    (llt.trainer.learning_rate), so there is no scheduler state to keep
    best            the best-validation state so far, its epoch and accuracy, the per-epoch history
    generators      the training generator (batch order, augmentation), the state of each endless
                    sub-batch cycler (its current permutation and position), torch's global CPU/CUDA RNG

The mask, the exemplar memory and the teacher logits are not copied: they are artifacts of finished
stages (masks/, the herded indices in checkpoints/, teaching/) and are read back from there. The
checkpoint records fingerprints of the mask, the teaching set and the schedule; one that does not match
the training being resumed is ignored (with a note) rather than mixed in.

Writing happens on a background thread, so the training pays only for the snapshot (a copy of the
tensors on their own device). At most one snapshot waits while another is written; a newer snapshot
replaces a waiting one (the file on disk always holds a whole, recent epoch). Every write is atomic
(temporary file, fsync, rename), so a crash in the middle of a write leaves the previous checkpoint.
A training's file lives in `checkpoints/epoch/<key>.pt` (with `<key>.json` beside it: key and epoch,
for `llt list`) until the stage that contains it finishes
(RunDir.mark_done removes the folder).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from llt import safeload, storage
from llt.errors import LLTError

KIND = "llt-epoch-checkpoint"


def fingerprint_mask(mask: dict | None) -> str:
    """sha256 over the names, shapes and bits of a mask (conv weight name -> bool tensor); "dense" for None."""
    if not mask:
        return "dense"
    h = hashlib.sha256()
    for name in sorted(mask):
        m = mask[name].detach().to("cpu", torch.bool).contiguous()
        h.update(f"{name}:{tuple(m.shape)};".encode())
        h.update(np.packbits(m.numpy().reshape(-1)).tobytes())
    return h.hexdigest()[:16]


def fingerprint_tensor(t: torch.Tensor | None) -> str:
    if t is None:
        return "none"
    a = t.detach().cpu().contiguous()
    return hashlib.sha256(f"{a.dtype}:{tuple(a.shape)};".encode() + a.numpy().tobytes()).hexdigest()[:16]


def _to_cpu(obj):
    """Tensors of a nested dict/list on the CPU (those of a snapshot: already private copies)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _clone(obj):
    """A snapshot on the tensors' own device (cheap on a GPU: no host transfer on the training thread)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


class EpochCheckpoint:
    """The epoch checkpoint of one training (one `Engine.fit` call), identified by `key`.

    `identity` (JSON-able) says which training it belongs to: task, schedule, mask and teaching
    fingerprints. `load()` returns the stored state when the identity matches, else None. `save(epoch,
    state)` snapshots now and writes in the background; `close()` ends the writer (waiting for a write
    in progress; with flush=True also writing the waiting snapshot). Errors of the writer (a full disk)
    are raised on the training thread at the next save/close.
    """

    def __init__(self, path: str | Path, key: str, identity: dict, every: int = 1):
        if every < 0:
            raise ValueError("every must be >= 0")
        self.path, self.key, self.identity, self.every = Path(path), key, identity, every
        self._cond = threading.Condition()
        self._pending: tuple | None = None
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.stats = {"snapshots": 0, "writes": 0, "dropped": 0, "snapshot_seconds": 0.0, "write_seconds": 0.0,
                      "bytes": 0}

    # ------------------------------------------------------------------------------------------ reading
    def load(self) -> dict | None:
        """The stored training state (tensors on the CPU) if this training has one, else None."""
        self._remove_temporaries()
        if not self.path.is_file():
            return None
        try:
            obj = safeload.load_file(self.path)
        except LLTError as e:    # a file that is not what it claims: never trusted, never fatal
            print(f"[llt] note: ignoring the epoch checkpoint ({e}); this training starts from the beginning of "
                  f"its stage", file=sys.stderr)
            return None
        try:
            meta = json.loads(obj["meta"])
            if meta["kind"] != KIND:
                raise ValueError(meta["kind"])
        except (TypeError, KeyError, ValueError, IndexError, RecursionError):
            print(f"[llt] note: ignoring {self.path}: not an llt epoch checkpoint; this training starts from the "
                  f"beginning of its stage", file=sys.stderr)
            return None
        if meta.get("identity") != json.loads(json.dumps(self.identity)):
            print(f"[llt] note: the epoch checkpoint {self.path} belongs to another training (task, schedule, "
                  f"mask or teaching set differ); starting this training from the beginning", file=sys.stderr)
            return None
        obj["meta"] = meta
        return obj

    def _remove_temporaries(self) -> None:
        """Temporaries left by a write that was killed (the checkpoint under the final name is intact)."""
        if self.path.parent.is_dir():
            for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ writing
    def due(self, epoch: int, last_epoch: int) -> bool:
        return self.every > 0 and epoch < last_epoch and epoch % self.every == 0

    def save(self, epoch: int, state: dict, frozen: dict | None = None) -> None:
        """Snapshot `state` (nested dicts of tensors and JSON-able values) after `epoch` and queue its write.
        `frozen` entries are taken as they are (tensors the caller never changes in place; None -> {})."""
        self._raise_writer_error()
        t0 = time.perf_counter()
        snap = _clone(state)
        snap.update({k: ({} if v is None else v) for k, v in (frozen or {}).items()})
        event = None
        if any(isinstance(v, torch.Tensor) and v.is_cuda for v in _leaves(snap)):
            event = torch.cuda.Event()
            event.record()
        self.stats["snapshots"] += 1
        self.stats["snapshot_seconds"] += time.perf_counter() - t0
        item = (epoch, snap, event)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"llt-checkpoint-{self.key}", daemon=True)
                self._thread.start()
            if self._pending is not None:
                self.stats["dropped"] += 1
            self._pending = item
            self._cond.notify_all()

    def close(self, flush: bool = False) -> None:
        """Stop the writer: wait for the write in progress (and, with flush, write the waiting snapshot)."""
        with self._cond:
            if not flush and self._pending is not None:
                self._pending = None
                self.stats["dropped"] += 1
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued snapshot is on disk (the writer keeps running); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: (self._pending is None and not self._busy) or self._error is not None,
                                       timeout)

    def _loop(self) -> None:
        stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                item, self._pending, self._busy = self._pending, None, True
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        self._write(item)
                else:
                    self._write(item)
            except BaseException as e:   # surfaced on the training thread
                self._error = e
                return
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, item: tuple) -> None:
        epoch, snap, event = item
        t0 = time.perf_counter()
        if event is not None:
            event.synchronize()
        meta = {"kind": KIND, "key": self.key, "epoch": epoch, "identity": self.identity,
                "time": round(time.time(), 3)}
        storage.atomic_torch_save(self.path, {**_to_cpu(snap), "meta": json.dumps(meta)})
        # a small note beside it, so `llt list` can say where a run stopped without reading the checkpoint
        storage.atomic_write_json(self.path.with_suffix(".json"), {"key": self.key, "epoch": epoch,
                                                                "epochs": self.identity.get("epochs")})
        self.stats["writes"] += 1
        self.stats["bytes"] = self.path.stat().st_size
        self.stats["write_seconds"] += time.perf_counter() - t0


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def require_state(obj: dict, keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise LLTError(f"{source}: not a complete epoch checkpoint (missing {', '.join(missing)})")
