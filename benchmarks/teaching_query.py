"""Seconds for the lottery-teaching query plus teacher logits on a large pool.

    python benchmarks/teaching_query.py [--device cuda] [--pool 100000] [--exemplars 200 800]

For each exemplar count: teacher features of the whole pool and of the exemplars, the greedy kNN query
(50 neighbours each, without replacement), one frozen augmentation of the selection and the teacher's
logits of both branches. Random uint8 images of CIFAR shape; the full-width model in eval mode. Prints
JSON with the median of --repeats runs after one warm-up.
"""

import argparse
import json
import statistics
import time

import _common  # noqa: F401
import torch
from _common import machine, sync

from llt.data.augment import Normalizer, make_generator
from llt.models import build_model
from llt.teaching import build_teaching_set


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pool", type=int, default=100000)
    ap.add_argument("--exemplars", type=int, nargs="+", default=[200, 800])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp32", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = make_generator(0, dev)
    pool = torch.randint(0, 256, (args.pool, 3, 32, 32), dtype=torch.uint8, device=dev, generator=g)
    model = build_model(5, 2, width=args.width, seed=0).to(dev).eval()
    cl = dev.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    norm = Normalizer((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), dev, channels_last=cl)
    autocast = None if (args.fp32 or dev.type != "cuda") else torch.bfloat16
    out = {}
    for n_ex in args.exemplars:
        memory = torch.randint(0, 256, (n_ex, 3, 32, 32), dtype=torch.uint8, device=dev, generator=g)
        heads = max(1, n_ex // 200)
        times, selected = [], 0
        for r in range(args.repeats + 1):
            sync(dev)
            t0 = time.perf_counter()
            ts = build_teaching_set(model, pool, memory, heads, 50, norm, make_generator(r, dev), 2048, autocast)
            sync(dev)
            times.append(time.perf_counter() - t0)
            selected = int(ts.pool_idx.numel())
        out[str(n_ex)] = {"seconds": round(statistics.median(times[1:]), 3), "selected": selected,
                          "warmup_seconds": round(times[0], 3)}
    print(json.dumps({"benchmark": "teaching_query", "device": str(dev), "pool": args.pool, "width": args.width,
                      "bf16": autocast is not None, "results": out, **machine()}, indent=2))


if __name__ == "__main__":
    main()
