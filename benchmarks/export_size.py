"""Sizes of exported tickets: the demo runs' tickets (given as run directories) and a full-width
PreAct-ResNet-18 under a random mask of a chosen density (3.64 %: the paper's CIFAR-10 ticket), in each
export layout, against the dense llt checkpoint. Prints JSON.

    python benchmarks/export_size.py [--runs RUN_DIR ...] [--task 5] [--density 0.0364]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch

from llt.export import export_state
from llt.methods.external import export_run
from llt.models import build_model
from llt.pruning import Mask, random_controls
from llt.storage import atomic_torch_save, save_checkpoint


def sizes_of(model, mask: Mask, folder: Path, tag: str) -> dict:
    out = {"remaining_weights": round(100 * mask.density(), 4)}
    save_checkpoint(folder / f"{tag}-dense.pt", model.state_dict(), {})
    out["llt_checkpoint_bytes"] = (folder / f"{tag}-dense.pt").stat().st_size
    for fmt, dtype in (("llt", torch.float32), ("prune", torch.float32), ("packed", torch.float16), ("packed-fp32", torch.float32)):
        path = folder / f"{tag}-{fmt}.pt"
        atomic_torch_save(path, export_state(model, model.state_dict(), mask, fmt.split("-")[0], dtype))
        out[f"{fmt}_bytes"] = path.stat().st_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--task", type=int, default=5)
    ap.add_argument("--density", type=float, default=0.0364)
    args = ap.parse_args()
    results = {"benchmark": "export_size"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for run in args.runs:
            row = {}
            for fmt in ("llt", "prune", "packed"):
                row[f"{fmt}_bytes"] = export_run(run, args.task, fmt, str(folder / f"x.{fmt}"))
            row["packed_fp32_bytes"] = export_run(run, args.task, "packed", str(folder / "x.p32"), fp32=True)
            results[Path(run).name] = row
        model = build_model(5, 2, width=64, seed=0)
        ones = Mask.ones(model)
        target = Mask({n: torch.zeros_like(m) for n, m in ones.masks.items()})
        k = round(args.density * ones.num_total())
        flat = torch.zeros(ones.num_total(), dtype=torch.bool)
        flat[:k] = True                  # only the count matters: random_controls spreads it at random
        start = 0
        for n in target.names():
            size = target[n].numel()
            target.masks[n] = flat[start:start + size].view_as(target[n])
            start += size
        [mask] = random_controls([target], "random", torch.Generator().manual_seed(0))
        mask.apply_(model)
        results[f"full_width_random_{args.density:.4f}"] = sizes_of(model, mask, folder, "full")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
