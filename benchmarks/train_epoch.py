"""Seconds per task-1 epoch and per distillation epoch on random data of CIFAR-10 shapes.

    python benchmarks/train_epoch.py [--device cuda] [--compile] [--old-tasks 4] [--epochs 3] [--width 64]

Task 1: 9,000 new images, batch 256. Distillation (task k+1 with k old tasks, default k = 4, the largest
memory of the CIFAR-10 protocol): 9,000 new images + 100 exemplars per old class, sub-batches of 64, and
a frozen unlabeled set of 50 x exemplars images with teacher logits. Data, masks and logits live on the
device; timing is the median epoch after one warm-up epoch (compilation happens there), device
synchronised. Prints JSON: seconds per epoch, images/s through the backbone, model FLOPs utilisation.
"""

import argparse
import json
import statistics
import time

import _common  # noqa: F401
import torch
from _common import add_workload_args, distill_workload, machine, sync

from llt.data.augment import make_generator
from llt.models import forward_flops_per_image
from llt.trainer import Schedule, TaskData, Trainer


def timed_epochs(trainer, k, data, epochs, device):
    sched = Schedule(epochs=1, lr=0.01, milestones=(60, 80), batch_size=256)
    times = []
    for e in range(epochs + 1):                     # the first epoch is the warm-up
        sync(device)
        t0 = time.perf_counter()
        trainer.fit_task(k, data, sched, make_generator(e, device))
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[1:], times[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per kind (after one warm-up epoch)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--peak-tflops", type=float, default=989.4)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.compile and dev.type != "cuda":   # llt compiles on CUDA only; inductor's CPU backward of this model crashed
        ap.error("--compile is for CUDA devices (llt never compiles on the CPU)")
    torch.backends.cudnn.benchmark = True
    w = distill_workload(dev, args.width, args.new_images, args.old_tasks, args.per_class)
    k, C, n_old, g = w["old_tasks"], w["classes_per_task"], w["num_old"], w["generator"]
    images, labels, new_idx, mem_idx, val_idx = w["images"], w["labels"], w["new_idx"], w["memory_idx"], w["val_idx"]
    teach, model, norm = w["teaching"], w["model"], w["normalizer"]
    n_total = images.shape[0]
    autocast = None if (args.fp32 or dev.type != "cuda") else torch.bfloat16
    trainer = Trainer(model, norm, autocast, eval_batch_size=1024, compile=args.compile)
    first_labels = torch.randint(0, C, (n_total,), device=dev, generator=g)   # task 1 knows classes 0..C-1 only
    first = TaskData(images, first_labels, new_idx, mem_idx[:0], val_idx)
    t1, t1_warm = timed_epochs(trainer, 0, first, args.epochs, dev)
    distill = TaskData(images, labels, new_idx, mem_idx, val_idx, teach)
    td, td_warm = timed_epochs(trainer, k, distill, args.epochs, dev)
    flops = forward_flops_per_image(model, 32)
    steps = -(-(args.new_images + n_old) // 64)
    distill_images = steps * (64 + 64 + 64)      # random + balanced + unlabeled sub-batches per step
    s1, sd = statistics.median(t1), statistics.median(td)

    def mfu(ips):
        return round(100 * 3 * flops * ips / 1e12 / args.peak_tflops, 2)

    print(json.dumps({
        "benchmark": "train_epoch", "device": str(dev), "compile": args.compile, "bf16": autocast is not None,
        "width": args.width, "old_tasks": k,
        "task1_epoch_seconds": round(s1, 4), "task1_images_per_second": round(args.new_images / s1),
        "task1_mfu_percent": mfu(args.new_images / s1), "task1_warmup_epoch_seconds": round(t1_warm, 2),
        "distill_epoch_seconds": round(sd, 4), "distill_steps_per_epoch": steps,
        "distill_images_per_second": round(distill_images / sd), "distill_mfu_percent": mfu(distill_images / sd),
        "distill_warmup_epoch_seconds": round(td_warm, 2),
        "note": "each epoch includes one validation pass over the seen classes' validation images",
        "forward_gflops_per_image": round(flops / 1e9, 4), "peak_tflops": args.peak_tflops, **machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
