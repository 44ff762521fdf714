"""Shared helpers for the benchmark scripts: import path, machine description, careful timing."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # run from a source tree (the GPU machine has no installed package)
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, warmup: int = 3, repeats: int = 10) -> tuple[float, list[float]]:
    """Median wall time of fn() over `repeats` runs after `warmup` runs, synchronising the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def add_workload_args(ap) -> None:
    """The arguments of distill_workload (device, width, new images, old tasks, exemplars per class)."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--new-images", type=int, default=9000)
    ap.add_argument("--old-tasks", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=100)


def distill_workload(dev, width: int = 64, new_images: int = 9000, old_tasks: int = 4, per_class: int = 100,
                     classes_per_task: int = 2):
    """Random data of CIFAR-10 shapes for task old_tasks+1 of the protocol, on the device: the images
    (new ones first, then 100 exemplars per old class), labels, index sets, a frozen unlabeled set of
    50 x exemplars images with teacher logits, a full model (channels-last on CUDA) and the normaliser.
    Returns a dict."""
    from llt.data.augment import Normalizer, make_generator
    from llt.models import build_model
    from llt.teaching import TeachingSet

    k, C = old_tasks, classes_per_task
    n_old = per_class * C * k
    g = make_generator(0, dev)
    n_total = new_images + n_old
    images = torch.randint(0, 256, (n_total, 3, 32, 32), dtype=torch.uint8, device=dev, generator=g)
    labels = torch.cat([torch.randint(k * C, (k + 1) * C, (new_images,), device=dev, generator=g),
                        torch.randint(0, k * C, (n_old,), device=dev, generator=g)])
    new_idx = torch.arange(new_images, device=dev)
    n_unl = 50 * n_old
    teach = TeachingSet(torch.randint(0, 256, (n_unl, 3, 32, 32), dtype=torch.uint8, device=dev, generator=g),
                        torch.randn(n_unl, k * C, device=dev, generator=g),
                        torch.randn(n_unl, k * C, device=dev, generator=g), torch.arange(n_unl, device=dev))
    cl = torch.device(dev).type == "cuda"
    model = build_model(5, C, width=width, seed=0).to(dev)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    norm = Normalizer((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), dev, channels_last=cl)
    return {"images": images, "labels": labels, "new_idx": new_idx,
            "memory_idx": torch.arange(new_images, n_total, device=dev),
            "val_idx": new_idx[: 1000 * (k + 1)] if new_images >= 1000 * (k + 1) else new_idx,
            "teaching": teach, "model": model, "normalizer": norm, "generator": g, "old_tasks": k,
            "classes_per_task": C, "num_old": n_old}
