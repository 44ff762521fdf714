"""`llt run`, `llt resume` and `llt eval`: config -> data -> stream -> method -> records -> summary.

`llt.context.prepare` loads the data and opens the run directory; the method (llt.methods.dense, topdown,
bottomup) is a stage machine over the Engine. Running the same command again into the same run directory
skips finished stages, so a long run can be carried on across separate invocations.
"""

from __future__ import annotations

import json
import shutil
import time

from llt.config import RunConfig
from llt.console import format_comparison, format_stream_table
from llt.context import Context, check_format, load_model_state, open_run, prepare, resolve_device
from llt.errors import LLTError
from llt.evaluation import accuracy
from llt.subbatches import empty_sub_batch
from llt.registry import REGISTRY, TICKET_SEARCHES
from llt.methods.retrain import run_retrain
from llt.models import remaining_weights
from llt.runs import RunDir, ensure_writable, run_name
from llt.storage import load_checkpoint


def run(cfg: RunConfig, preset: str | None = None, progress: str = "auto", rd: RunDir | None = None) -> int:
    """Run (or continue) `cfg` into its run directory, OUT_DIR/<name>-<hash>, or into `rd` (llt resume)."""
    resolve_device(cfg.run.device)
    t0 = time.perf_counter()
    fresh = False
    if rd is None:
        name = run_name(cfg, preset)
        fresh = not (ensure_writable(cfg.run.out_dir) / name).exists()
        rd = RunDir.create(cfg.run.out_dir, name)
    with rd.lock():           # a second process stops here, before touching anything
        try:
            ctx = prepare(cfg, preset, rd=rd)
            _run_method(ctx, t0, progress)
        except BaseException:
            if fresh and not rd.file("manifest.json").exists():   # failed before anything was recorded
                shutil.rmtree(rd.path, ignore_errors=True)
            raise
    return 0


def resume(run_dir: str, data_dir: str | None = None, progress: str = "auto") -> int:
    """`llt resume RUN_DIR`: continue a run with the config it was started with (finished stages are
    skipped, an unfinished training continues from its last epoch checkpoint). A re-training directory
    (`<ticket run>-retrain-<init>[-<mask>]`) continues its re-training."""
    cfg, rd = open_run(run_dir, data_dir)
    check_format(rd)
    retrain = rd.file("retrain.json")
    if retrain.is_file():
        try:
            info = json.loads(retrain.read_text())
            source, init, mask = info["source_run"], info["init"], info.get("mask", "ticket")
            rel = info.get("source_run_relative")
            if rel and (rd.path / rel / "manifest.json").is_file():    # moved together, or another working dir
                source = str(rd.path / rel)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LLTError(f"{retrain}: not a valid re-training record ({e})") from None
        run_retrain(source, init, mask, out_dir=rd.path.parent, data_dir=data_dir, progress=progress)
        return 0
    external = rd.file("external.json")
    if external.is_file():          # llt retrain --weights W --mask M --task k
        from llt.methods.external import retrain_subnetwork

        try:
            info = json.loads(external.read_text())
            args = (info["weights"], info["mask"], int(info["task"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise LLTError(f"{external}: not a valid re-training record ({e})") from None
        import dataclasses

        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(rd.path.parent)))
        retrain_subnetwork(*args, cfg, info.get("preset"), info.get("teacher"), progress, into=rd.path)
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
    ctx.load_seconds = load_s
    method = REGISTRY[cfg.run.method]
    if method.fused:        # the data decide the number of tasks of an image array only now
        why = empty_sub_batch(cfg.train.batch_size, stream.num_tasks, stream.exemplars_per_class > 0)
        if why:
            raise LLTError(why)
    summary = method.runner()(ctx, progress)
    if method.retrains and cfg.prune.retrain_after:
        print("re-training the tickets from the original initialisation (TR-BU)")
        tr = run_retrain(ctx.rd.path, "original", "ticket", progress=progress)
        print(format_comparison(summary, tr))


def describe_stream(ctx: Context, progress: str = "auto") -> None:
    """run.method=stream: build the stream, record it and print its table (no training)."""
    cfg, ds, stream = ctx.cfg, ctx.ds, ctx.stream
    rows = stream.describe(ds.class_names)
    if ctx.rd.stage_done("stream"):
        print("stream: already built (stage marker present), skipping")
    else:
        ctx.rd.record("stream", tasks=rows, load_seconds=round(ctx.load_seconds, 3))
        ctx.rd.mark_done("stream")
    pool_info = {"pool": cfg.data.pool, "num_images": None if ctx.pool is None else int(ctx.pool.shape[0])}
    print(format_stream_table(rows, pool_info))
    if stream.exemplar_selection == "herding":
        print(f"exemplars: herding, {stream.exemplars_per_class} per class, selected from teacher features once each "
              f"task is learned (the memory column counts only what is known before training)")


def evaluate_run(run_dir: str, task: int, data_dir: str | None = None, which: str = "ticket") -> dict:
    """Re-evaluate the stored model of task k on tasks 1..k (heads 1..k only); print and return the row.

    which="ticket": the model reported after task k (the ticket for Top-Down / Bottom-Up runs, the dense
    model for dense runs); which="dense": the dense reference of a Bottom-Up run.
    """
    cfg, rd = open_run(run_dir, data_dir)
    if which == "dense":
        if not REGISTRY[cfg.run.method].keeps_reference:
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
    ev = accuracy(model, ctx.test_images, ctx.stream.test_labels, [x.test_idx for x in ctx.stream.tasks[:task]],
                  ctx.normalizer, ctx.eval_batch, ctx.autocast_dtype)
    sa = sum(ev["row"]) / len(ev["row"])
    label = "dense reference" if which == "dense" else ("ticket" if cfg.run.method in TICKET_SEARCHES else "model")
    if REGISTRY[cfg.run.method].classifier == "nme":
        label += (f" (network output; the summary's matrix is {REGISTRY[cfg.run.method].label}'s nearest-mean-of-"
                  f"exemplars classifier)")
    print(f"task {task} {label}: test accuracy per task " + " ".join(f"T{i + 1} {v:.2f}" for i, v in enumerate(ev["row"]))
          + f" | SA {sa:.2f} | remaining weights {remaining_weights(model):.2f} %")
    return {"row": ev["row"], "sa": sa, "stored_row": meta.get("row")}
