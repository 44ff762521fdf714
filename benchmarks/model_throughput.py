"""Forward+backward throughput of the PreAct-ResNet-18 (train mode, both branches' heads built).

    python benchmarks/model_throughput.py [--device cuda] [--batch 256] [--precision bf16] [--channels-last]
                                          [--compile none|default|max-autotune-no-cudagraphs|reduce-overhead]
                                          [--step] [--width 64]

One iteration = forward of the main branch over all heads, cross-entropy, backward (and an SGD step with
--step). Prints JSON: images/s (median over repeats, device synchronised), FLOPs per image (counted from
the conv shapes: training ~ 3 x forward) and model FLOPs utilisation against --peak-tflops.
"""

import argparse
import json

import _common  # noqa: F401
import torch
import torch.nn.functional as F
from _common import machine, median_seconds

from llt.models import build_model, forward_flops_per_image


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", default="none")
    ap.add_argument("--step", action="store_true", help="include an SGD step (momentum, weight decay)")
    ap.add_argument("--iters", type=int, default=20, help="iterations per timed repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--peak-tflops", type=float, default=989.4, help="H100 SXM dense bf16 spec; 795 was measured")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model = build_model(5, 2, width=args.width, image_size=args.size, seed=0).to(dev)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    flops = forward_flops_per_image(model, args.size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).to(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    use_bf16 = args.precision == "bf16"

    def step(x, y):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(model(x, 5, "main"), y)
        loss.backward()
        if args.step:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    fn = step if args.compile == "none" else torch.compile(step, mode=None if args.compile == "default" else args.compile)

    def run():
        for _ in range(args.iters):
            fn(x, y)

    sec, _ = median_seconds(run, dev, warmup=2, repeats=args.repeats)
    ips = args.iters * args.batch / sec
    achieved = 3 * flops * ips / 1e12
    print(json.dumps({
        "benchmark": "model_forward_backward", "device": str(dev), "batch": args.batch, "width": args.width,
        "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile, "sgd_step": args.step,
        "images_per_second": round(ips), "ms_per_step": round(1e3 * sec / args.iters, 3),
        "forward_gflops_per_image": round(flops / 1e9, 4), "achieved_tflops": round(achieved, 2),
        "mfu_percent": round(100 * achieved / args.peak_tflops, 2), "peak_tflops": args.peak_tflops, **machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
