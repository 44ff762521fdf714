"""The scale of EWC's Fisher: llt's per-image empirical Fisher against FACIL's batch form (the squared gradient of
a batch's mean loss, times the batch size, averaged), on the task-1 model of a finished run. Prints JSON.

    python benchmarks/ewc_fisher_scale.py RUN_DIR [--batches 32 64 256]

RUN_DIR: any finished llt run (its checkpoints/task1.pt and config). FACIL's lambda = 5000 multiplies the batch
form; the ratio printed says what lambda carries the same penalty on llt's per-image Fisher (docs/baselines.md).
"""

from __future__ import annotations

import argparse
import json

import _common  # noqa: F401  (import path)
import torch
import torch.nn.functional as F

from llt.context import load_model_state, open_run, prepare
from llt.methods.ewc import empirical_fisher, penalised_names
from llt.storage import load_checkpoint


def batch_fisher(model, images, labels, normalizer, names, batch):
    """FACIL's form: sum over batches of (grad of the batch-mean CE)^2 * batch size, over the image count."""
    model.eval()
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for i in range(0, images.shape[0], batch):
        x, y = normalizer(images[i:i + batch]).float(), labels[i:i + batch]
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, 1, "main").float(), y).backward()
        for n in names:
            out[n] += params[n].grad.float() ** 2 * x.shape[0]
    return {n: v / images.shape[0] for n, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 256])
    ap.add_argument("--data-dir")
    a = ap.parse_args()
    cfg, rd = open_run(a.run_dir, a.data_dir)
    ctx = prepare(cfg, None, rd=rd, need_pool=False)
    model = ctx.new_model().float().to(memory_format=torch.contiguous_format)
    load_model_state(model, load_checkpoint(rd.file("checkpoints/task1.pt"))[0], "task 1")
    idx = ctx.stream.tasks[0].train_idx
    images, labels = ctx.train_images[idx], ctx.train_labels[idx]
    names = penalised_names(model, heads=False)
    per_image = empirical_fisher(model, images, labels, 1, ctx.normalizer, names)
    total = float(sum(v.sum() for v in per_image.values()))
    out = {"run": str(rd.path), "images": int(idx.numel()), "per_image": {"sum": total,
           "max": float(max(v.max() for v in per_image.values()))}, "batch_form": {}}
    for b in a.batches:
        bf = batch_fisher(model, images, labels, ctx.normalizer, names, b)
        s = float(sum(v.sum() for v in bf.values()))
        out["batch_form"][str(b)] = {"sum": s, "max": float(max(v.max() for v in bf.values())), "ratio": total / s}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
