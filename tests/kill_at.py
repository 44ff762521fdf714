"""Run the `llt` command line and SIGKILL the process at a chosen point (used by tests/test_resume.py).

    python tests/kill_at.py POINT N [--grow] -- LLT ARGS...

POINT, N:
    epoch-step N        at the second optimizer step after N epochs of this process (inside an epoch),
                        once the checkpoint queued at the end of the last epoch is on disk (with epochs
                        of seconds, as in real runs, it is; a tiny test epoch could outrun the writer)
    checkpoint-write 0  in the middle of the first epoch-checkpoint write that replaces an earlier
                        checkpoint: half of the bytes are in the temporary file, the rename has not happened
    prune N             right after the N-th global magnitude pruning (inside a pruning level, before its
                        training and before anything of the level is written)
    done STAGE          right after the marker of STAGE is written (e.g. task1: between tasks)
    none 0              no fault
--grow forces Bottom-Up down its longest path (no ticket accepted, no stop rule; every loop runs to
prune.max_rounds), as tests/test_bottomup.py does in-process, so every task prunes.
SIGKILL cannot be caught: no handler, no `finally`, no atexit runs, as when a machine is lost.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    sep = sys.argv.index("--")
    point, arg, *flags = sys.argv[1:sep]
    llt_args = sys.argv[sep + 1:]

    from llt import cli, runs, storage
    from llt.methods import bottomup, topdown
    from llt.trainer import Trainer

    count = [0]

    def hit(n: int) -> bool:
        count[0] += 1
        return count[0] == n

    if "--grow" in flags:
        bottomup.accept_ticket = lambda gap, decay: False
        bottomup.first_task_rule_broken = lambda *a: False
        bottomup.regrow_rule_broken = lambda *a: False
    if point == "epoch-step":
        from llt.checkpointing import EpochCheckpoint
        from llt.console import Progress

        real_update, real_step, real_save, epochs, writers = Progress.update, Trainer._step, EpochCheckpoint.save, [0], []

        def update(self, epoch, stats):
            real_update(self, epoch, stats)
            epochs[0] += 1

        def save(self, *a, **kw):
            writers.append(self)
            real_save(self, *a, **kw)

        def step(self, opt, loss):
            real_step(self, opt, loss)
            if epochs[0] >= int(arg) and hit(2):
                if writers:             # as after a real epoch of seconds: the last checkpoint is on disk
                    writers[-1].wait(30)
                die()

        Progress.update, Trainer._step, EpochCheckpoint.save = update, step, save
    elif point == "checkpoint-write":
        import io

        import torch

        real_save = storage.atomic_torch_save

        def save(path, obj):
            path = Path(path)
            if path.parent.name == "epoch" and path.is_file():
                buf = io.BytesIO()
                torch.save(obj, buf)
                data = buf.getvalue()
                fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.write(fd, data[: len(data) // 2])
                os.fsync(fd)
                die()
            real_save(path, obj)

        storage.atomic_torch_save = save
    elif point == "prune":
        for module in (bottomup, topdown):
            real_prune = module.global_magnitude_prune

            def prune(*a, _real=real_prune, **kw):
                out = _real(*a, **kw)
                if hit(int(arg)):
                    die()
                return out

            module.global_magnitude_prune = prune
    elif point == "done":
        real_mark = runs.RunDir.mark_done

        def mark_done(self, stage, **info):
            real_mark(self, stage, **info)
            if stage == arg:
                die()

        runs.RunDir.mark_done = mark_done
    elif point != "none":
        raise SystemExit(f"unknown point {point}")
    return cli.main(llt_args)


if __name__ == "__main__":
    sys.exit(main())
