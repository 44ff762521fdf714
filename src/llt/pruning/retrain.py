"""TR-BU: re-train the tickets of a finished Bottom-Up run in isolation (METHOD section 6, main_train.py).

For each task t, the mask of the Bottom-Up ticket of task t is applied to an initialisation and trained
on task t alone (its new data, the exemplars of earlier classes and, for t >= 2, lottery teaching with the
teaching set the Bottom-Up run's dense reference produced after task t-1), then tested on tasks 1..t.
Initialisations (`init`):
    original   theta_0 of the Bottom-Up run (the lottery-ticket test; the default)
    reference  the dense reference of task t-1 (theta_0 for task 1), as Bottom-Up's candidates start
    random     a fresh random initialisation (the random re-initialisation control)
The result goes into its own run directory, `<bu run>-retrain-<init>`, with its own summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from llt.engine import Engine, finish, history_record, load_teaching, open_run, prepare, task_line
from llt.errors import LLTError
from llt.pruning.mask import Mask
from llt.runs import RunDir, check_summary, load_checkpoint, save_checkpoint

INITS = ("original", "reference", "random")


def finished_run(run_dir: str | Path, method: str) -> dict:
    """The summary of a finished run of `method`; a clear error otherwise."""
    rd = RunDir(run_dir)
    if not rd.file("manifest.json").is_file():
        raise LLTError(f"{run_dir} is not an llt run directory (no manifest.json)")
    path = rd.file("summary.json")
    if not path.is_file():
        raise LLTError(f"{run_dir} is not a finished run (no summary.json): finish it first by running the same "
                       f"`llt run` command again")
    try:
        summary = check_summary(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise LLTError(f"{path}: not valid JSON ({e})") from None
    if summary["method"] != method:
        raise LLTError(f"{run_dir} is a finished run of method {summary['method']!r}, not {method!r}")
    return summary


def check_nested(masks: list[Mask]) -> None:
    """Bottom-Up masks must grow: raise LLTError naming the task and layer where one does not."""
    for t in range(len(masks) - 1):
        outside = masks[t].first_outside(masks[t + 1])
        if outside:
            layer, count = outside
            raise LLTError(f"the masks are not nested: the mask of task {t + 1} keeps {count} weights of {layer} "
                           f"that the mask of task {t + 2} drops (Bottom-Up tickets only grow)")


def run_retrain(src_dir: str | Path, init: str = "original", out_dir: str | Path | None = None,
                data_dir: str | None = None, progress: str = "auto") -> dict:
    if init not in INITS:
        raise LLTError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    src = RunDir(src_dir)
    summary = finished_run(src_dir, "bu")
    cfg, _ = open_run(str(src_dir), data_dir)
    out = Path(out_dir) if out_dir else src.path.parent
    name = f"{src.path.name}-retrain-{init}"
    fresh = not (out / name).exists()
    rd = RunDir.create(out, name)
    try:
        with rd.lock():
            return _retrain(src, summary, cfg, rd, out, init, progress)
    except BaseException:
        if fresh and not list(rd.path.glob("stages/*.done")):    # nothing finished: leave nothing behind
            shutil.rmtree(rd.path, ignore_errors=True)
        raise


def _retrain(src: RunDir, summary: dict, cfg, rd: RunDir, out: Path, init: str, progress: str) -> dict:
    src_dir = src.path
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out)))
    ctx = prepare(cfg, None, rd=rd, need_pool=False)
    n = ctx.stream.num_tasks
    if summary["num_tasks"] != n:
        raise LLTError(f"{src_dir}: the run has {summary['num_tasks']} tasks, its config now gives {n}")
    eng = Engine(ctx, n * cfg.train.epochs, progress)
    masks = [Mask.load(src.file(f"masks/task{t}.pt"), eng.model) for t in range(1, n + 1)]
    check_nested(masks)
    theta0, _ = load_checkpoint(src.file("checkpoints/init.pt"))
    rd.write_json("retrain.json", {"source_run": str(src.path), "init": init})
    R, remaining = [], []
    for t in range(n):
        T = t + 1
        ckpt = rd.file(f"checkpoints/task{T}.pt")
        if rd.stage_done(f"task{T}"):
            _, meta = load_checkpoint(ckpt)
            R.append(meta["row"])
            remaining.append(100 * masks[t].density())
            eng.progress.skip(cfg.train.epochs)
            print(f"task {T}: re-trained before (stage marker present), skipping")
            continue
        t0 = time.perf_counter()
        if init == "original" or (init == "reference" and t == 0):
            start = theta0
        elif init == "reference":
            start, _ = load_checkpoint(src.file(f"checkpoints/ref{t}.pt"))
        else:
            start = {k: v.cpu() for k, v in ctx.new_model(f"retrain-rand/task{T}").state_dict().items()}
        eng.load(start, f"the {init} initialisation")      # the trainer applies the mask before training
        teaching = None
        if t > 0 and cfg.teaching.enabled:
            path = src.file(f"teaching/task{t}.pt")
            if not path.is_file():
                raise LLTError(f"{path} is missing: the Bottom-Up run's teaching set for task {T} is needed")
            teaching = load_teaching(path, ctx.device)
        eng.restore_herded(load_checkpoint(src.file(f"checkpoints/task{T}.pt"))[1])   # herding only
        res = eng.fit(t, eng.schedule(), f"augment/trbu/task{T}", f"task {T}/{n} re-train", mask=masks[t].masks,
                      teaching=teaching)
        eng.model.load_state_dict(res.best_state)
        assert not masks[t].pruned_nonzero(eng.model)
        ev = eng.evaluate(t)
        seconds = round(time.perf_counter() - t0, 3)
        save_checkpoint(ckpt, eng.state(), {"task": T, "row": ev["row"], "density": masks[t].density(),
                                            "best_epoch": res.best_epoch, "best_val": res.best_val})
        masks[t].save(rd.file(f"masks/task{T}.pt"), task=T)
        rd.record("retrain", task=T, row=ev["row"], density=masks[t].density(), best_epoch=res.best_epoch,
                  best_val=res.best_val, seconds=seconds, epochs=history_record(res))
        rd.mark_done(f"task{T}")
        R.append(ev["row"])
        remaining.append(100 * masks[t].density())
        print(task_line(t, n, ev["row"], f"remaining weights {100 * masks[t].density():.2f} % | {seconds:.1f} s"))
    return finish(ctx, R, remaining, method="trbu", source_run=str(src.path), init=init)

