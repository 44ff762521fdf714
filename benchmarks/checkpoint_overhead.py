"""What per-epoch checkpointing costs a training, and how long resuming from a checkpoint takes.

    python benchmarks/checkpoint_overhead.py [--device cuda] [--compile] [--epochs 6] [--repeats 3] [--width 64]

The workload is the heaviest training of `paper-cifar10-bu`: a distillation epoch of task 5 (k = 4 old
tasks) on random data of CIFAR-10 shapes, as in benchmarks/train_epoch.py (9,000 new images + 800
exemplars, sub-batches of 64, 40,000 frozen unlabeled images with teacher logits), the model masked to
5 % density (a ticket: the mask multiply is part of every step). Each repeat trains `--epochs` epochs
without checkpoints and `--epochs` epochs with a checkpoint after every epoch but the last (as
run.checkpoint_every=1 does), alternating so drift hits both alike; the device is synchronised around
each training. Reported:

    overhead_percent            (median time with - without) / (epochs - 1) / median epoch time without
    snapshot_ms                 time the training thread spends taking a snapshot (tensors copied on the
                                device), per checkpoint
    write_seconds               background time per checkpoint write (host copy, serialise, fsync, rename)
    checkpoint_mb, dropped      size of one checkpoint; snapshots replaced before being written
    resume_load_seconds         reading the checkpoint file (torch.load, weights_only)
    resume_restore_seconds      restoring model, optimizer, generators and sub-batch streams

Checkpoints go to --dir (default: a temporary folder on the same disk as the working directory).
--write-only skips the training: it times the snapshot and the write of a full training state (model,
momentum, best state) of the given width, which is quick even on a CPU at full width.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
import torch
from _common import add_workload_args, distill_workload, machine, sync

from llt.checkpointing import EpochCheckpoint
from llt.data.augment import make_generator
from llt.models import conv_weight_names
from llt.pruning import Mask
from llt.trainer import Schedule, TaskData, Trainer


def build(args, dev):
    w = distill_workload(dev, args.width, args.new_images, args.old_tasks, args.per_class)
    model, g = w["model"], w["generator"]
    data = TaskData(w["images"], w["labels"], w["new_idx"], w["memory_idx"], w["val_idx"], w["teaching"])
    params = dict(model.named_parameters())
    mask = Mask({n: torch.rand(params[n].shape, device=dev, generator=g) < args.density for n in conv_weight_names(model)})
    autocast = None if (args.fp32 or dev.type != "cuda") else torch.bfloat16
    trainer = Trainer(model, w["normalizer"], autocast, eval_batch_size=1024, compile=args.compile)
    return trainer, data, w["old_tasks"], mask


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--epochs", type=int, default=6, help="epochs per timed training (checkpoints after all but the last)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--dir", default=None, help="folder for the checkpoints (default: a temporary folder in .)")
    ap.add_argument("--write-only", action="store_true", help="time snapshot + write of a full state, no training")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2")
    dev = torch.device(args.device)
    if args.compile and dev.type != "cuda":   # llt compiles on CUDA only; inductor's CPU backward of this model crashed
        ap.error("--compile is for CUDA devices (llt never compiles on the CPU)")
    torch.backends.cudnn.benchmark = True
    trainer, data, k, mask = build(args, dev)
    sched = Schedule(epochs=args.epochs, lr=0.01, milestones=(60, 80), batch_size=256)
    tmp = tempfile.TemporaryDirectory(dir=args.dir or ".", prefix=".llt-bench-ckpt-")
    path = Path(tmp.name) / "epoch" / "bench.pt"
    identity = {"key": "bench", "epochs": args.epochs}

    def train(seed: int, checkpoint: EpochCheckpoint | None) -> float:
        sync(dev)
        t0 = time.perf_counter()
        trainer.fit_task(k, data, sched, make_generator(seed, dev), mask=mask, checkpoint=checkpoint)
        if checkpoint is not None:
            checkpoint.close()           # as Engine.fit does: waits for the write in progress
        sync(dev)
        return time.perf_counter() - t0

    if args.write_only:
        return write_only(args, trainer, path, identity, dev, tmp)
    warm = train(0, None)                # compilation and cuDNN autotuning happen here
    off, on, stats = [], [], []
    for r in range(args.repeats):
        off.append(train(r + 1, None))
        ck = EpochCheckpoint(path, "bench", identity, every=1)
        on.append(train(r + 1, ck))
        stats.append(ck.stats)
    epoch_off = statistics.median(off) / args.epochs
    extra = (statistics.median(on) - statistics.median(off)) / (args.epochs - 1)
    n_ck = sum(s["snapshots"] for s in stats)
    writes = sum(s["writes"] for s in stats)

    # resume: read the last checkpoint and restore it (a training whose every epoch is done returns at once)
    load, restore = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state = EpochCheckpoint(path, "bench", identity).load()
        load.append(time.perf_counter() - t0)
        done = Schedule(epochs=state["meta"]["epoch"], lr=0.01, milestones=(60, 80), batch_size=256)
        sync(dev)
        t0 = time.perf_counter()
        trainer.fit_task(k, data, done, make_generator(0, dev), mask=mask, resume=state)
        sync(dev)
        restore.append(time.perf_counter() - t0)
    size = path.stat().st_size
    tmp.cleanup()
    print(json.dumps({
        "benchmark": "checkpoint_overhead", "device": str(dev), "compile": args.compile, "width": args.width,
        "old_tasks": k, "density": args.density, "epochs": args.epochs, "repeats": args.repeats,
        "epoch_seconds_without": round(epoch_off, 4),
        "training_seconds_without": [round(x, 3) for x in off], "training_seconds_with": [round(x, 3) for x in on],
        "extra_seconds_per_checkpoint": round(extra, 4),
        "overhead_percent": round(100 * extra / epoch_off, 2),
        "snapshot_ms": round(1000 * sum(s["snapshot_seconds"] for s in stats) / max(n_ck, 1), 2),
        "write_seconds": round(sum(s["write_seconds"] for s in stats) / max(writes, 1), 4),
        "checkpoints": n_ck, "writes": writes, "dropped": sum(s["dropped"] for s in stats),
        "checkpoint_mb": round(size / 2**20, 1),
        "resume_load_seconds": round(statistics.median(load), 4),
        "resume_restore_seconds": round(statistics.median(restore), 4),
        "warmup_seconds": round(warm, 2), **machine(),
    }, indent=2))


def write_only(args, trainer, path, identity, dev, tmp):
    model = trainer.model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()                                   # momentum buffers exist, as after any step
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    snap, write, total = [], [], []
    for e in range(args.repeats):
        ck = EpochCheckpoint(path, "bench", identity)
        sync(dev)
        t0 = time.perf_counter()
        ck.save(e + 1, {"model": model.state_dict(), "optimizer": opt.state_dict()}, frozen={"best_state": best})
        snap.append(time.perf_counter() - t0)
        ck.close(flush=True)
        total.append(time.perf_counter() - t0)
        write.append(ck.stats["write_seconds"])
    size = path.stat().st_size
    tmp.cleanup()
    print(json.dumps({
        "benchmark": "checkpoint_write", "device": str(dev), "width": args.width, "checkpoint_mb": round(size / 2**20, 1),
        "snapshot_ms": round(1000 * statistics.median(snap), 2), "write_seconds": round(statistics.median(write), 4),
        "snapshot_and_write_seconds": round(statistics.median(total), 4), "repeats": args.repeats, **machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
