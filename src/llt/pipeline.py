"""`llt run` and `llt eval`: config -> data -> stream -> stages -> records -> summary.

`llt.engine.prepare` loads the data and opens the run directory; a method is a stage machine over the
Engine:
`run_dense` here, `run_topdown` and `run_bottomup` in llt.pruning. Stages of the dense method (`cil`,
the original's main_CIL.py), each finished by a marker written last:

    teach{t}   lottery teaching after task t (t = 1..n-1): queried unlabeled images + teacher logits,
               teacher = the best model of task t          -> teaching/task{t}.pt
    task{t}    training on task t (from the best model of task t-1), best epoch by validation accuracy,
               test evaluation on tasks 1..t                -> checkpoints/task{t}.pt

Running the same command again into the same run directory skips finished stages, so a long run can be
carried on across separate invocations.
"""

from __future__ import annotations

import json
import shutil
import time

from llt.config import RunConfig
from llt.engine import (Context, Engine, check_format, finish, history_record, load_model_state, open_run, prepare,
                        resolve_device, task_line)
from llt.errors import LLTError
from llt.evaluation import evaluate_seen_tasks
from llt.models import remaining_weights
from llt.pruning.bottomup import run_bottomup
from llt.pruning.retrain import run_retrain
from llt.pruning.topdown import run_topdown
from llt.runs import RunDir, ensure_writable, load_checkpoint, run_name, save_checkpoint

def format_stream_table(rows: list[dict], pool_info: dict) -> str:
    head = f"{'task':>4}  {'classes':<16} {'names':<28} {'train':>6} {'val':>5} {'test':>5} {'memory':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        names = ", ".join(r["names"])
        lines.append(f"{r['task']:>4}  {', '.join(map(str, r['classes'])):<16} {names[:28]:<28} "
                     f"{r['num_train']:>6} {r['num_val']:>5} {r['num_test']:>5} {r['num_memory']:>6}")
    pool = pool_info.get("num_images")
    lines.append(f"unlabeled pool: {pool_info.get('pool')} ({pool} images)" if pool is not None else "unlabeled pool: none")
    return "\n".join(lines)


def format_comparison(bu: dict, tr: dict) -> str:
    """Per task: SA of the dense reference, the Bottom-Up ticket and the re-trained ticket, and remaining weights."""
    head = f"{'after':<7} {'dense SA':>9} {'BU SA':>8} {'TR-BU SA':>9} {'weights%':>9}  decision"
    lines = [head, "-" * len(head)]
    for t in range(bu["num_tasks"]):
        lines.append(f"T1~{t + 1:<4} {bu['reference_sa'][t]:9.2f} {bu['sa'][t]:8.2f} {tr['sa'][t]:9.2f} "
                     f"{bu['remaining_weights'][t]:9.2f}  {bu['decisions'][t].split(':')[0]}")
    lines.append(f"re-grows that ran to the cap (prune.max_rounds): {bu['regrows_hit_cap']} of {bu['regrows']}; "
                 f"task-1 pruning ran to the cap: {'yes' if bu['first_task_hit_cap'] else 'no'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ dense CIL

def run_dense(ctx: Context, progress: str = "auto") -> dict:
    """Dense class-incremental learning with lottery teaching: stage task{t} per task (teach{t} before it)."""
    cfg, rd, stream = ctx.cfg, ctx.rd, ctx.stream
    n = stream.num_tasks
    eng = Engine(ctx, n * cfg.train.epochs, progress)
    R, remaining = [], []
    for t in range(n):
        stage, ckpt = f"task{t + 1}", rd.file(f"checkpoints/task{t + 1}.pt")
        if rd.stage_done(stage):
            state, meta = load_checkpoint(ckpt)
            eng.load(state, str(ckpt))
            eng.restore_herded(meta)
            R.append(meta["row"])
            remaining.append(meta["remaining_weights"])
            eng.progress.skip(cfg.train.epochs)
            print(f"task {t + 1}: finished before (stage marker present), skipping")
            continue
        teaching = eng.teaching(t)
        t0 = time.perf_counter()
        result = eng.fit(t, eng.schedule(), f"augment/task{t + 1}", f"task {t + 1}/{n}", teaching=teaching)
        seconds = time.perf_counter() - t0
        eng.model.load_state_dict(result.best_state)
        ev = eng.evaluate(t)
        if stream.exemplar_selection == "herding" and t < n - 1:
            eng.herd(t)
        rw = remaining_weights(eng.model)
        meta = {"task": t + 1, "row": ev["row"], "per_class": ev["per_class"], "best_epoch": result.best_epoch,
                "best_val": result.best_val, "remaining_weights": rw, "seconds": round(seconds, 3),
                "herded": eng.herded_meta()}
        save_checkpoint(ckpt, eng.state(), meta)
        rd.record("task", task=t + 1, row=ev["row"], sa=sum(ev["row"]) / len(ev["row"]), per_class=ev["per_class"],
                  best_epoch=result.best_epoch, best_val=result.best_val, seconds=round(seconds, 3),
                  epochs=history_record(result))
        rd.mark_done(stage, seconds=round(seconds, 3))
        R.append(ev["row"])
        remaining.append(rw)
        print(task_line(t, n, ev["row"], f"best epoch {result.best_epoch} (val {result.best_val:.2f}) | {seconds:.1f} s"))
    return finish(ctx, R, remaining)


# ------------------------------------------------------------------------------------------ entry points

def run(cfg: RunConfig, preset: str | None = None, progress: str = "auto", rd: RunDir | None = None) -> int:
    """Run (or continue) `cfg` into its run directory, OUT_DIR/<name>-<hash>, or into `rd` (llt resume)."""
    resolve_device(cfg.run.device)
    t0 = time.perf_counter()
    fresh = False
    if rd is None:
        name = run_name(cfg, preset)
        fresh = not (ensure_writable(cfg.run.out_dir) / name).exists()
        rd = RunDir.create(cfg.run.out_dir, name)
    try:
        with rd.lock():
            ctx = prepare(cfg, preset, rd=rd)
            _run_method(ctx, t0, progress)
    except BaseException:
        if fresh and not rd.file("manifest.json").exists():   # failed before anything was recorded
            shutil.rmtree(rd.path, ignore_errors=True)
        raise
    return 0


def resume(run_dir: str, data_dir: str | None = None, progress: str = "auto") -> int:
    """`llt resume RUN_DIR`: continue a run with the config it was started with (finished stages are
    skipped, an unfinished training continues from its last epoch checkpoint). A TR-BU directory
    (`<bu run>-retrain-<init>`) continues its re-training."""
    cfg, rd = open_run(run_dir, data_dir)
    check_format(rd)
    retrain = rd.file("retrain.json")
    if retrain.is_file():
        try:
            info = json.loads(retrain.read_text())
            source, init = info["source_run"], info["init"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LLTError(f"{retrain}: not a valid re-training record ({e})") from None
        run_retrain(source, init, out_dir=rd.path.parent, data_dir=data_dir, progress=progress)
        return 0
    if rd.file("summary.json").is_file():
        print(f"{rd.path} is finished; checking every stage and printing its results again")
    manifest = json.loads(rd.file("manifest.json").read_text())
    return run(cfg, manifest.get("preset"), progress, rd=rd)


def _run_method(ctx: Context, t0: float, progress: str) -> None:
    cfg = ctx.cfg
    load_s = time.perf_counter() - t0
    print(f"run directory: {ctx.rd.path}")
    if ctx.ds.provenance.get("checksums_matched") is False:
        print(f"NOTE: {ctx.ds.name} differs from the official release (recorded in manifest.json)")
    ds, stream = ctx.ds, ctx.stream
    print(f"{ds.name}: {ds.info()['num_train']} train / {ds.info()['num_test']} test images of shape "
          f"{list(ds.image_shape)}, {stream.num_tasks} tasks x {stream.classes_per_task} classes, "
          f"class order {list(stream.class_order)}, seed {cfg.run.seed}, device {ctx.device} (loaded in {load_s:.2f} s)")
    if cfg.run.method == "stream":
        rows = stream.describe(ds.class_names)
        if ctx.rd.stage_done("stream"):
            print("stream: already built (stage marker present), skipping")
        else:
            ctx.rd.record("stream", tasks=rows, load_seconds=round(load_s, 3))
            ctx.rd.mark_done("stream")
        pool_info = {"pool": cfg.data.pool, "num_images": None if ctx.pool is None else int(ctx.pool.shape[0])}
        print(format_stream_table(rows, pool_info))
        if stream.exemplar_selection == "herding":
            print(f"exemplars: herding, {stream.exemplars_per_class} per class, selected from teacher features once each "
                  f"task is learned (the memory column counts only what is known before training)")
    elif cfg.run.method == "td":
        run_topdown(ctx, progress)
    elif cfg.run.method == "bu":
        bu = run_bottomup(ctx, progress)
        if cfg.prune.retrain_after:
            print("re-training the tickets from the original initialisation (TR-BU)")
            tr = run_retrain(ctx.rd.path, "original", progress=progress)
            print(format_comparison(bu, tr))
    else:
        run_dense(ctx, progress)


def evaluate_run(run_dir: str, task: int, data_dir: str | None = None, which: str = "ticket") -> dict:
    """Re-evaluate the stored model of task k on tasks 1..k (heads 1..k only); print and return the row.

    which="ticket": the model reported after task k (the ticket for Top-Down / Bottom-Up runs, the dense
    model for dense runs); which="dense": the dense reference of a Bottom-Up run.
    """
    cfg, rd = open_run(run_dir, data_dir)
    if which == "dense":
        if cfg.run.method != "bu":
            raise LLTError(f"{run_dir}: --dense needs a Bottom-Up run (only those keep a dense reference per task); "
                           f"this is a {cfg.run.method} run")
        ckpt, stage = rd.file(f"checkpoints/ref{task}.pt"), f"ref{task}"
    else:
        ckpt, stage = rd.file(f"checkpoints/task{task}.pt"), f"task{task}"
    if task < 1 or not rd.stage_done(stage):
        done = sorted(int(p.stem[4:]) for p in rd.path.glob("stages/task*.done") if p.stem[4:].isdigit())
        raise LLTError(f"{run_dir}: task {task} is not finished in this run (finished tasks: {done or 'none'})")
    ctx = prepare(cfg, None, rd=rd, need_pool=False)
    model = ctx.new_model()
    state, meta = load_checkpoint(ckpt)
    load_model_state(model, state, str(ckpt))
    ev = evaluate_seen_tasks(model, ctx.test_images, ctx.stream, task - 1, ctx.normalizer,
                             cfg.train.eval_batch_size, ctx.autocast_dtype)
    sa = sum(ev["row"]) / len(ev["row"])
    label = "dense reference" if which == "dense" else ("ticket" if cfg.run.method in ("td", "bu") else "model")
    print(f"task {task} {label}: test accuracy per task " + " ".join(f"T{i + 1} {v:.2f}" for i, v in enumerate(ev["row"]))
          + f" | SA {sa:.2f} | remaining weights {remaining_weights(model):.2f} %")
    return {"row": ev["row"], "sa": sa, "stored_row": meta.get("row")}
