"""Re-training the masks of a finished ticket run in isolation: TR-BU, and the lottery-ticket controls.

For each task t, a mask is applied to an initialisation and trained on task t alone (its new data, the
exemplars of earlier classes and, for t >= 2, lottery teaching with the teaching set the source run
produced for task t), then tested on tasks 1..t (METHOD section 6, main_train.py). The source is a
finished Bottom-Up run (TR-BU: its tickets from theta_0) or Top-Down run.

    init  original   theta_0 of the source run (the lottery-ticket test; the default)
          reference  the dense reference of task t-1 (theta_0 for task 1), as Bottom-Up's candidates start
                     (Bottom-Up sources only: Top-Down keeps no dense reference)
          random     a fresh random initialisation (the random re-initialisation control)
    mask  ticket            the source run's ticket of task t
          random            uniformly random over all conv weights, as many kept weights as the ticket
          layerwise-random  random within each layer, as many kept weights per layer as the ticket
    Random masks come from one random score per weight (llt.pruning.controls), so they are nested across
    tasks exactly as the tickets are (growing for Bottom-Up, shrinking for Top-Down).

The result goes into its own run directory, `<source run>-retrain-<init>` (with `-<mask>` appended for a
random mask), with its own summary.json; `llt report` shows it beside its source.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from llt.console import task_line
from llt.context import Context, open_run, prepare
from llt.data.stream import derive_seed
from llt.errors import LLTError
from llt.methods.base import Done, Engine, cpu_state, finish, finished_run, history_record, load_teaching
from llt.pruning.controls import random_controls
from llt.registry import RETRAIN_INITS as INITS
from llt.registry import RETRAIN_MASKS as MASKS
from llt.registry import REGISTRY, TICKET_SEARCHES, retrain_name, retrained_name
from llt.pruning.mask import Mask
from llt.runs import RunDir
from llt.storage import load_checkpoint



def check_monotone(masks: list[Mask], method: str) -> None:
    """Bottom-Up masks must grow and Top-Down masks shrink: raise LLTError naming the task and layer
    where they do not."""
    m = REGISTRY[method]
    grow = m.masks == "grow"
    for t in range(len(masks) - 1):
        small, big = (masks[t], masks[t + 1]) if grow else (masks[t + 1], masks[t])
        outside = small.first_outside(big)
        if outside:
            layer, count = outside
            a, b = (t + 1, t + 2) if grow else (t + 2, t + 1)
            raise LLTError(f"the masks are not nested: the mask of task {a} keeps {count} weights of {layer} "
                           f"that the mask of task {b} drops ({m.label} tickets only {m.masks})")


def run_retrain(src_dir: str | Path, init: str = "original", mask: str = "ticket", out_dir: str | Path | None = None,
                data_dir: str | None = None, progress: str = "auto") -> dict:
    if init not in INITS:
        raise LLTError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if mask not in MASKS:
        raise LLTError(f"--mask must be one of {', '.join(MASKS)}, got {mask!r}")
    src = RunDir(src_dir)
    summary = finished_run(src_dir, TICKET_SEARCHES)
    if init == "reference" and not REGISTRY[summary["method"]].keeps_reference:
        raise LLTError(f"{src_dir}: --init reference needs a Bottom-Up run (only those keep a dense reference per "
                       f"task); use original or random for a {summary['method']} run")
    cfg, _ = open_run(str(src_dir), data_dir)
    # the tickets are read before anything is created: a damaged or hostile mask file leaves no folder behind
    tickets = [Mask.load(src.file(f"masks/task{t}.pt")) for t in range(1, summary["num_tasks"] + 1)]
    out = Path(out_dir) if out_dir else src.path.parent
    name = retrain_name(src.path.name, init, mask)
    fresh = not (out / name).exists()
    rd = RunDir.create(out, name)
    with rd.lock():
        try:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out)))
            ctx = prepare(cfg, None, rd=rd, need_pool=False)
            return _retrain(ctx, src, summary, tickets, init, mask, progress)
        except BaseException:
            if fresh and not list(rd.path.glob("stages/*.done")):    # nothing finished: leave nothing behind
                shutil.rmtree(rd.path, ignore_errors=True)
            raise


def _retrain(ctx: Context, src: RunDir, summary: dict, tickets: list[Mask], init: str, mask_kind: str,
             progress: str) -> dict:
    cfg, rd, n = ctx.cfg, ctx.rd, ctx.stream.num_tasks
    method = summary["method"]
    if summary["num_tasks"] != n:
        raise LLTError(f"{src.path}: the run has {summary['num_tasks']} tasks, its config now gives {n}")
    eng = Engine(ctx, n * cfg.train.epochs, progress)
    for t, ticket in enumerate(tickets, 1):
        ticket.check_fits(eng.model, str(src.file(f"masks/task{t}.pt")))
    check_monotone(tickets, method)
    if mask_kind == "ticket":
        masks = tickets
    else:
        gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, f"controls/{mask_kind}"))
        masks = random_controls(tickets, mask_kind, gen)
    theta0, _ = load_checkpoint(src.file("checkpoints/init.pt"))
    # the source both absolute and relative to this run (found again from any working directory, and after
    # the two are moved together)
    rd.write_json("retrain.json", {"source_run": str(src.path.resolve()),
                                   "source_run_relative": os.path.relpath(src.path.resolve(), rd.path.resolve()),
                                   "source_method": method, "init": init, "mask": mask_kind})
    label = f"re-train ({init} init, {mask_kind} mask)"
    R, densities = [], []
    for t in range(n):
        T = t + 1

        def compute(t=t, T=T) -> Done:
            if init == "original" or (init == "reference" and t == 0):
                start = theta0
            elif init == "reference":
                start, _ = load_checkpoint(src.file(f"checkpoints/ref{t}.pt"))
            else:
                start = cpu_state(ctx.new_model(f"retrain-rand/task{T}").state_dict())
            eng.load(start, f"the {init} initialisation")     # the trainer zeroes the pruned weights
            teaching = None
            if t > 0 and cfg.teaching.enabled:
                path = src.file(f"teaching/task{t}.pt")
                if not path.is_file():
                    raise LLTError(f"{path} is missing: the source run's teaching set for task {T} is needed")
                teaching = load_teaching(path, ctx.device)
            eng.restore_herded(load_checkpoint(src.file(f"checkpoints/task{T}.pt"))[1])   # herding only
            res = eng.fit(t, eng.schedule(), f"augment/trbu/task{T}", f"task {T}/{n} {label}", mask=masks[t],
                          teaching=teaching)
            eng.model.load_state_dict(res.best_state)
            assert not masks[t].pruned_nonzero(eng.model)
            row = eng.accuracy(t)["row"]
            print(task_line(t, n, row, f"remaining weights {100 * masks[t].density():.2f} %"))
            meta = {"task": T, "row": row, "density": masks[t].density(), "num_kept": masks[t].num_kept(),
                    "ticket_num_kept": tickets[t].num_kept(), "best_epoch": res.best_epoch, "best_val": res.best_val}
            return Done(eng.state(), meta, mask=masks[t],
                        record={**meta, "per_layer_density": masks[t].per_layer_density(), "epochs": history_record(res)})

        done = eng.stage(f"task{T}", compute, event="retrain", epochs=cfg.train.epochs, masked=True,
                         skip_note=f"task {T}: re-trained before (stage marker present), skipping")
        if done.mask != masks[t]:
            raise LLTError(f"{rd.file(f'masks/task{T}.pt')} differs from the mask this re-training derives from "
                           f"{src.path}: the source run changed; start a new re-training")
        R.append(done.meta["row"])
        densities.append(done.meta["density"])
    return finish(ctx, R, densities, method=retrained_name(method), source_run=str(src.path.resolve()),
                  source_method=method, init=init, mask=mask_kind)
