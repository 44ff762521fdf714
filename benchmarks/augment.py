"""Throughput of the whole-batch augmentation (crop with 4-pixel zero padding + flip + normalise).

    python benchmarks/augment.py [--device cuda] [--batch 256] [--size 32] [--channels-last] [--bf16]

Gathers a random batch from a uint8 dataset held on the device (as the trainer does), augments and
normalises it. Prints JSON with images/s (median over repeats, device synchronised).
"""

import argparse
import json

import _common  # noqa: F401
import torch
from _common import machine, median_seconds

from llt.data.augment import Normalizer, crop_flip, make_generator


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--dataset-size", type=int, default=50000)
    ap.add_argument("--steps", type=int, default=100, help="batches per timed repeat")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = make_generator(0, dev)
    data = torch.randint(0, 256, (args.dataset_size, 3, args.size, args.size), dtype=torch.uint8, device=dev, generator=g)
    norm = Normalizer((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), dev,
                      dtype=torch.bfloat16 if args.bf16 else torch.float32, channels_last=args.channels_last)
    sink = []

    def run():
        for _ in range(args.steps):
            idx = torch.randint(0, args.dataset_size, (args.batch,), device=dev, generator=g)
            sink.append(norm(crop_flip(data[idx], g)).sum())
        sink.clear()

    sec, times = median_seconds(run, dev, warmup=2, repeats=args.repeats)
    print(json.dumps({
        "benchmark": "augment", "device": str(dev), "batch": args.batch, "size": args.size,
        "channels_last": args.channels_last, "bf16": args.bf16,
        "images_per_second": round(args.steps * args.batch / sec),
        "ms_per_batch": round(1e3 * sec / args.steps, 4), **machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
