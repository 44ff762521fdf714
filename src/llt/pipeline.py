"""`llt run` and `llt eval`: config -> data -> stream -> stages -> records -> summary.

Stages of the dense method (`cil`, the original's main_CIL.py), each finished by a marker written last:

    teach{t}   lottery teaching after task t (t = 1..n-1): queried unlabeled images + teacher logits,
               teacher = the best model of task t          -> teaching/task{t}.pt
    task{t}    training on task t (from the best model of task t-1), best epoch by validation accuracy,
               test evaluation on tasks 1..t                -> checkpoints/task{t}.pt

Running the same command again into the same run directory skips finished stages, so a long run can be
carried on across separate invocations. Top-Down and Bottom-Up will drive the same pieces.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from llt.config import RunConfig, from_tree
from llt.data.augment import Normalizer, make_generator
from llt.data.dataset import ImageDataset
from llt.data.sources import load_dataset, load_pool
from llt.data.stream import Stream, build_stream, derive_seed, herding_exemplars
from llt.errors import LLTError
from llt.evaluation import evaluate_seen_tasks
from llt.models import build_model, remaining_weights
from llt.runs import RunDir, build_summary, ensure_writable, load_checkpoint, run_name, save_checkpoint
from llt.teaching import TeachingSet, build_teaching_set, extract_features
from llt.trainer import Schedule, TaskData, Trainer

AVAILABLE_METHODS = ("stream", "cil")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LLTError(f"run.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLTError(f"run.device={name}: CUDA is not available on this machine")
    return dev


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


def format_matrix(R: list[list[float]], sa: list[float], forgetting: list, remaining: list[float]) -> str:
    n = len(R)
    head = "after  " + " ".join(f"{'T' + str(i + 1):>6}" for i in range(n)) + f" {'SA':>7} {'forget':>7} {'weights%':>9}"
    lines = [head, "-" * len(head)]
    for t, row in enumerate(R):
        cells = " ".join(f"{v:6.2f}" for v in row) + " " * (7 * (n - t - 1))
        f = "" if forgetting[t] is None else f"{forgetting[t]:.2f}"
        lines.append(f"T1~{t + 1:<3} {cells} {sa[t]:7.2f} {f:>7} {remaining[t]:9.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ context

@dataclass
class Context:
    """What every stage of a run reads: config, data on the device, the stream, the pool."""

    cfg: RunConfig
    rd: RunDir
    ds: ImageDataset
    stream: Stream
    pool: torch.Tensor | None
    device: torch.device
    normalizer: Normalizer
    autocast_dtype: torch.dtype | None
    train_images: torch.Tensor   # uint8, on the device
    train_labels: torch.Tensor   # remapped, on the device
    test_images: torch.Tensor    # uint8, on the device

    def new_model(self):
        c = self.cfg
        model = build_model(self.stream.num_tasks, self.stream.classes_per_task, c.model.width, c.model.stem_stride,
                            self.ds.image_shape[1], seed=derive_seed(c.run.seed, "init")).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model


def _precision(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a state_dict, refusing (with a clear message) one whose names or shapes do not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise LLTError(f"{source}: the checkpoint does not fit the model built from the config "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise LLTError(f"{source}: {k} has shape {tuple(state[k].shape)} in the checkpoint, the model built from "
                           f"the config expects {tuple(v.shape)} (was the run made with another config?)")
    model.load_state_dict(state)


def prepare(cfg: RunConfig, preset: str | None, rd: RunDir | None = None, need_pool: bool = True) -> Context:
    """Load data, pool and stream; create (or reopen) the run directory and write its manifest once."""
    device = resolve_device(cfg.run.device)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    ds = load_dataset(cfg.data)
    pool, pool_info = None, {"pool": cfg.data.pool, "used": False}
    if need_pool and (cfg.run.method == "stream" or cfg.teaching.enabled):
        pool, pool_info = load_pool(cfg.data, ds)
        if pool is None and cfg.run.method != "stream":
            raise LLTError("data.pool=none but lottery teaching is on: choose a pool or set teaching.enabled=false")
    d = cfg.data
    stream = build_stream(ds.name, ds.train_labels, ds.test_labels, ds.num_classes,
                          classes_per_task=d.classes_per_task, num_tasks=d.num_tasks, class_order=d.class_order,
                          val_fraction=d.val_fraction, exemplars_per_class=d.exemplars_per_class,
                          exemplar_selection=d.exemplar_selection, seed=cfg.run.seed)
    if rd is None:
        rd = RunDir.create(cfg.run.out_dir, run_name(cfg, preset))
    if not rd.file("manifest.json").is_file():
        rd.write_manifest(cfg, preset, device=str(device),
                          seeds={"run": cfg.run.seed, **{p: derive_seed(cfg.run.seed, p) for p in ("split", "init", "augment", "teaching")}},
                          dataset={"name": ds.name, **ds.info()}, pool=pool_info, stream=stream.manifest())
        save_checkpoint(rd.file("stream.pt"), stream.state_dict(), stream.manifest())
    channels_last = device.type == "cuda"
    autocast = _precision(cfg, device)
    return Context(cfg=cfg, rd=rd, ds=ds, stream=stream, pool=pool, device=device,
                   normalizer=Normalizer(ds.mean, ds.std, device, channels_last=channels_last),
                   autocast_dtype=autocast, train_images=ds.train_images.to(device),
                   train_labels=stream.train_labels.to(device), test_images=ds.test_images.to(device))


# ------------------------------------------------------------------------------------------ dense CIL

class Progress:
    """Progress of a run: a bar per task on a terminal (loss, validation accuracy, time left for the whole
    run); elsewhere (logs, remote machines) one line every `every` epochs; nothing with quiet."""

    def __init__(self, total_epochs: int, quiet: bool = False, every: int = 10):
        self.total, self.done, self.seconds, self.quiet, self.every = total_epochs, 0, 0.0, quiet, every
        self.bar, self.desc, self.tty = None, "", sys.stderr.isatty()

    def start(self, desc: str, epochs: int):
        self.desc, self.epochs = desc, epochs
        if self.quiet or not self.tty:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=epochs, desc=desc, unit="ep", leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self, epoch: int, stats: dict):
        self.done += 1
        self.seconds += stats["seconds"]
        left = time.strftime("%H:%M:%S", time.gmtime(self.seconds / self.done * (self.total - self.done)))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{stats['loss']:.3f}", val=f"{stats['val']:.1f}", run_left=left, refresh=False)
            self.bar.update(1)
        elif not self.quiet and (epoch % self.every == 0 or epoch == self.epochs):
            print(f"  {self.desc} epoch {epoch}/{self.epochs}: loss {stats['loss']:.4f} val {stats['val']:.2f} "
                  f"lr {stats['lr']:.2g} | {stats['seconds']:.2f} s/epoch | run left {left}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _schedule(cfg: RunConfig) -> Schedule:
    t = cfg.train
    return Schedule(epochs=t.epochs, lr=t.lr, milestones=t.milestones, gamma=t.gamma, momentum=t.momentum,
                    weight_decay=t.weight_decay, batch_size=t.batch_size, temperature=cfg.teaching.temperature)


def _memory(ctx: Context, t: int, herded: dict) -> torch.Tensor:
    """Exemplar indices for learning task t (0-based): every class of tasks 0..t-1."""
    if ctx.stream.exemplar_selection == "herding":
        parts = [herded[lab] for task in ctx.stream.tasks[:t] for lab in task.labels if lab in herded]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return ctx.stream.memory(t)


def _herd(ctx: Context, model, t: int) -> dict:
    """Herding exemplars of task t's classes from the trained model's features."""
    out = {}
    task = ctx.stream.tasks[t]
    for lab in task.labels:
        idx = task.train_idx[ctx.stream.train_labels[task.train_idx] == lab]
        feats = extract_features(model, ctx.train_images[idx.to(ctx.device)], ctx.normalizer,
                                 ctx.cfg.train.eval_batch_size, ctx.autocast_dtype).cpu()
        out[lab] = idx[herding_exemplars(feats, ctx.stream.exemplars_per_class)]
    return out


def teaching_stage(ctx: Context, teacher, t: int, herded: dict) -> TeachingSet:
    """Stage teach{t}: the teaching set produced by the teacher after task t (1-based), computed once."""
    rd, stage = ctx.rd, f"teach{t}"
    path = rd.file(f"teaching/task{t}.pt")
    if rd.stage_done(stage):
        state, _ = load_checkpoint(path)
        return TeachingSet.from_state(state)
    t0 = time.perf_counter()
    memory = _memory(ctx, t, herded)
    gen = make_generator(derive_seed(ctx.cfg.run.seed, f"teaching/{t}"), ctx.device)
    ts = build_teaching_set(teacher, ctx.pool, ctx.train_images[memory.to(ctx.device)], t, ctx.cfg.teaching.neighbours,
                            ctx.normalizer, gen, ctx.cfg.train.eval_batch_size, ctx.autocast_dtype)
    seconds = time.perf_counter() - t0
    save_checkpoint(path, ts.state_dict(), {"task": t, "num_exemplars": int(memory.numel()),
                                            "num_selected": int(ts.pool_idx.numel())})
    rd.record("teaching", task=t, num_exemplars=int(memory.numel()), num_selected=int(ts.pool_idx.numel()),
              pool_size=int(ctx.pool.shape[0]), seconds=round(seconds, 3))
    rd.mark_done(stage, seconds=round(seconds, 3))
    print(f"lottery teaching after task {t}: {ts.pool_idx.numel()} unlabeled images queried for "
          f"{memory.numel()} exemplars in {seconds:.2f} s")
    return ts


def run_dense(ctx: Context, quiet: bool = False) -> dict:
    cfg, rd, stream = ctx.cfg, ctx.rd, ctx.stream
    n = stream.num_tasks
    model = ctx.new_model()
    trainer = Trainer(model, ctx.normalizer, ctx.autocast_dtype, eval_batch_size=cfg.train.eval_batch_size,
                      compile=cfg.train.compile and ctx.device.type == "cuda")
    progress = Progress(n * cfg.train.epochs, quiet)
    R, remaining, herded = [], [], {}
    for t in range(n):
        stage, ckpt = f"task{t + 1}", rd.file(f"checkpoints/task{t + 1}.pt")
        if rd.stage_done(stage):
            state, meta = load_checkpoint(ckpt)
            load_model_state(model, state, str(ckpt))
            herded.update({int(k): torch.tensor(v) for k, v in meta.get("herded", {}).items()})
            R.append(meta["row"])
            remaining.append(meta["remaining_weights"])
            progress.done += cfg.train.epochs
            print(f"task {t + 1}: finished before (stage marker present), skipping")
            continue
        teaching = None
        if t > 0 and cfg.teaching.enabled:
            teaching = teaching_stage(ctx, model, t, herded)
            teaching = TeachingSet(*(x.to(ctx.device) for x in (teaching.images, teaching.logits_main,
                                                                  teaching.logits_aux, teaching.pool_idx)))
        task = stream.tasks[t]
        data = TaskData(images=ctx.train_images, labels=ctx.train_labels, new_idx=task.train_idx.to(ctx.device),
                        memory_idx=_memory(ctx, t, herded).to(ctx.device),
                        val_idx=stream.val_seen(t).to(ctx.device), teaching=teaching)
        t0 = time.perf_counter()
        progress.start(f"task {t + 1}/{n}", cfg.train.epochs)
        try:
            gen = make_generator(derive_seed(cfg.run.seed, f"augment/task{t + 1}"), ctx.device)
            result = trainer.fit_task(t, data, _schedule(cfg), gen, on_epoch=progress.update)
        finally:
            progress.close()
        seconds = time.perf_counter() - t0
        model.load_state_dict(result.best_state)
        ev = evaluate_seen_tasks(model, ctx.test_images, stream, t, ctx.normalizer, cfg.train.eval_batch_size,
                                 ctx.autocast_dtype)
        if stream.exemplar_selection == "herding" and t < n - 1:
            herded.update(_herd(ctx, model, t))
        rw = remaining_weights(model)
        meta = {"task": t + 1, "row": ev["row"], "per_class": ev["per_class"], "best_epoch": result.best_epoch,
                "best_val": result.best_val, "remaining_weights": rw, "seconds": round(seconds, 3),
                "herded": {str(k): v.tolist() for k, v in herded.items()}}
        save_checkpoint(ckpt, {k: v.cpu() for k, v in model.state_dict().items()}, meta)
        rd.record("task", task=t + 1, row=ev["row"], sa=sum(ev["row"]) / len(ev["row"]), per_class=ev["per_class"],
                  best_epoch=result.best_epoch, best_val=result.best_val, seconds=round(seconds, 3),
                  epochs=[{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in result.history])
        rd.mark_done(stage, seconds=round(seconds, 3))
        R.append(ev["row"])
        remaining.append(rw)
        print(f"task {t + 1}/{n}: test accuracy per task " + " ".join(f"{v:.2f}" for v in ev["row"])
              + f" | SA {sum(ev['row']) / len(ev['row']):.2f} | best epoch {result.best_epoch} "
              f"(val {result.best_val:.2f}) | {seconds:.1f} s")
    summary = build_summary(cfg.run.method, ctx.ds.name, cfg.run.seed, R, remaining,
                            dataset_status=ctx.ds.provenance.get("status"))
    rd.write_json("summary.json", summary)
    print(format_matrix(summary["accuracy_matrix"], summary["sa"], summary["forgetting"], summary["remaining_weights"]))
    print(f"final SA {summary['final_sa']:.2f} | forgetting {summary['final_forgetting'] or 0:.2f} | "
          f"summary: {rd.file('summary.json')}")
    return summary


# ------------------------------------------------------------------------------------------ entry points

def run(cfg: RunConfig, preset: str | None = None, quiet: bool = False) -> int:
    if cfg.run.method not in AVAILABLE_METHODS:
        raise LLTError(f"run.method={cfg.run.method}: not available in this version of llt (available: "
                       f"{', '.join(AVAILABLE_METHODS)})")
    resolve_device(cfg.run.device)
    ensure_writable(cfg.run.out_dir)  # before the (possibly slow) data loading
    t0 = time.perf_counter()
    ctx = prepare(cfg, preset)
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
        return 0
    run_dense(ctx, quiet)
    return 0


def open_run(run_dir: str, data_dir: str | None = None) -> tuple[RunConfig, RunDir]:
    """The config of an existing run directory (optionally with another data folder)."""
    import json

    rd = RunDir(run_dir)
    path = rd.file("manifest.json")
    if not path.is_file():
        raise LLTError(f"{run_dir} is not an llt run directory (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
        cfg = from_tree(manifest["config"], origin=str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LLTError(f"{path}: not a valid llt manifest ({e})") from None
    if data_dir:
        import dataclasses

        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    return cfg, rd


def evaluate_run(run_dir: str, task: int, data_dir: str | None = None) -> dict:
    """Re-evaluate the stored model of task k on tasks 1..k; print and return the row."""
    cfg, rd = open_run(run_dir, data_dir)
    ckpt = rd.file(f"checkpoints/task{task}.pt")
    if task < 1 or not rd.stage_done(f"task{task}"):
        done = sorted(int(p.stem[4:]) for p in rd.path.glob("stages/task*.done"))
        raise LLTError(f"{run_dir}: task {task} is not finished in this run (finished tasks: {done or 'none'})")
    ctx = prepare(cfg, None, rd=rd, need_pool=False)
    import json

    expected = json.loads(rd.file("manifest.json").read_text()).get("stream", {})
    got = ctx.stream.manifest()
    changed = [k for k in ("sha256_train_idx", "sha256_test_idx", "class_order") if expected.get(k) != got.get(k)]
    if changed:
        raise LLTError(f"{run_dir}: the data no longer give the run's stream ({', '.join(changed)} differ); "
                       f"point --data-dir at the data the run used")
    model = ctx.new_model()
    state, meta = load_checkpoint(ckpt)
    load_model_state(model, state, str(ckpt))
    ev = evaluate_seen_tasks(model, ctx.test_images, ctx.stream, task - 1, ctx.normalizer,
                             cfg.train.eval_batch_size, ctx.autocast_dtype)
    sa = sum(ev["row"]) / len(ev["row"])
    print(f"task {task}: test accuracy per task " + " ".join(f"T{i + 1} {v:.2f}" for i, v in enumerate(ev["row"]))
          + f" | SA {sa:.2f} | remaining weights {remaining_weights(model):.2f} %")
    return {"row": ev["row"], "sa": sa, "stored_row": meta.get("row")}
