"""The run-level building blocks every method drives: open a run, train a task, evaluate, lottery teaching,
finish with a summary.

A method (dense CIL, Top-Down, Bottom-Up) is a stage machine over these; it decides which model, mask,
schedule and teacher each training uses, and writes records and stage markers. The Engine holds the one
model object of the run (states are loaded into it), the trainer, the progress display, and the run
context (data on the device, stream, pool, run directory).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import torch

from llt.checkpointing import EpochCheckpoint, fingerprint_mask, fingerprint_tensor
from llt.config import RunConfig, from_tree
from llt.data.augment import Normalizer, make_generator
from llt.data.dataset import ImageDataset
from llt.data.sources import load_dataset, load_pool
from llt.data.stream import Stream, build_stream, derive_seed, herding_exemplars
from llt.errors import LLTError
from llt.evaluation import evaluate_seen_tasks, task_accuracies
from llt.models import build_model
from llt.runs import FORMAT_VERSION, RunDir, build_summary, load_checkpoint, run_name, save_checkpoint
from llt.teaching import TeachingSet, build_teaching_set, extract_features
from llt.trainer import Schedule, TaskData, TaskResult, Trainer


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

    def new_model(self, seed_tag: str = "init"):
        c = self.cfg
        model = build_model(self.stream.num_tasks, self.stream.classes_per_task, c.model.width, c.model.stem_stride,
                            self.ds.image_shape[1], seed=derive_seed(c.run.seed, seed_tag)).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model


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


class Progress:
    """Progress of a run, by mode:
    - "auto": a bar per training on a terminal (loss, validation accuracy, time left for the whole run);
      elsewhere (logs, remote machines) one line every `every` epochs;
    - "jsonl": one JSON object per epoch on stderr, for machines;
    - "quiet": nothing (the per-task lines and the final table are printed all the same)."""

    MODES = ("auto", "quiet", "jsonl")

    def __init__(self, total_epochs: int, mode: str = "auto", every: int = 10):
        if mode not in self.MODES:
            raise ValueError(f"progress mode must be one of {self.MODES}, got {mode!r}")
        self.total, self.done, self.seconds, self.mode, self.every = total_epochs, 0, 0.0, mode, every
        self.bar, self.desc, self.epochs, self.tty = None, "", 0, sys.stderr.isatty()

    def skip(self, epochs: int) -> None:
        """Epochs of a stage that finished earlier (they count as done for the estimate)."""
        self.total -= epochs

    def start(self, desc: str, epochs: int, done: int = 0):
        """A training of `epochs` epochs begins; `done` of them were finished before (a resumed training)."""
        self.desc, self.epochs = desc, epochs
        self.skip(done)
        if self.mode != "auto" or not self.tty:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=epochs, initial=done, desc=desc, unit="ep", leave=False, file=sys.stderr,
                        dynamic_ncols=True)

    def update(self, epoch: int, stats: dict):
        self.done += 1
        self.seconds += stats["seconds"]
        left_s = self.seconds / self.done * max(self.total - self.done, 0)
        left = time.strftime("%H:%M:%S", time.gmtime(left_s))
        if self.mode == "jsonl":
            print(json.dumps({"event": "epoch", "stage": self.desc, "epoch": epoch, "epochs": self.epochs,
                              "loss": stats["loss"], "val": stats["val"], "lr": stats["lr"],
                              "seconds": round(stats["seconds"], 4), "run_seconds_left": round(left_s, 1)}),
                  file=sys.stderr, flush=True)
        elif self.bar is not None:
            self.bar.set_postfix(loss=f"{stats['loss']:.3f}", val=f"{stats['val']:.1f}", run_left=left, refresh=False)
            self.bar.update(1)
        elif self.mode == "auto" and (epoch % self.every == 0 or epoch == self.epochs):
            print(f"  {self.desc} epoch {epoch}/{self.epochs}: loss {stats['loss']:.4f} val {stats['val']:.2f} "
                  f"lr {stats['lr']:.2g} | {stats['seconds']:.2f} s/epoch | run left {left}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def history_record(result: TaskResult) -> list[dict]:
    return [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in result.history]


class Engine:
    def __init__(self, ctx: Context, total_epochs: int, progress: str = "auto"):
        self.ctx, self.cfg, self.rd = ctx, ctx.cfg, ctx.rd
        self.model = ctx.new_model()
        self.trainer = Trainer(self.model, ctx.normalizer, ctx.autocast_dtype,
                               eval_batch_size=ctx.cfg.train.eval_batch_size,
                               compile=ctx.cfg.train.compile and ctx.device.type == "cuda")
        self.progress = Progress(total_epochs, progress)
        self.herded: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ model
    def load(self, state: dict, source: str) -> None:
        load_model_state(self.model, state, source)

    def state(self) -> dict:
        """A CPU copy of the model's state_dict."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def schedule(self, epochs: int | None = None, lr: float | None = None, milestones: tuple[int, ...] | None = None) -> Schedule:
        t = self.cfg.train
        return Schedule(epochs=t.epochs if epochs is None else epochs, lr=t.lr if lr is None else lr,
                        milestones=t.milestones if milestones is None else milestones, gamma=t.gamma,
                        momentum=t.momentum, weight_decay=t.weight_decay, batch_size=t.batch_size,
                        temperature=self.cfg.teaching.temperature)

    def initial_state(self) -> dict:
        """theta_0, the run's initialisation (stage init: saved once, read back on reruns); loaded into the model."""
        path = self.rd.file("checkpoints/init.pt")
        if self.rd.stage_done("init"):
            init, _ = load_checkpoint(path)
            self.load(init, str(path))
            return init
        init = self.state()
        save_checkpoint(path, init, {"kind": "initialisation"})
        self.rd.mark_done("init")
        return init

    # ------------------------------------------------------------------------------------------ memory
    def memory(self, t: int) -> torch.Tensor:
        """Exemplar indices for learning task t (0-based): every class of tasks 0..t-1."""
        stream = self.ctx.stream
        if stream.exemplar_selection == "herding":
            parts = [self.herded[lab] for task in stream.tasks[:t] for lab in task.labels if lab in self.herded]
            return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        return stream.memory(t)

    def herd(self, t: int) -> None:
        """Herding exemplars of task t's classes (0-based) from the current model's features."""
        ctx = self.ctx
        task = ctx.stream.tasks[t]
        for lab in task.labels:
            idx = task.train_idx[ctx.stream.train_labels[task.train_idx] == lab]
            feats = extract_features(self.model, ctx.train_images[idx.to(ctx.device)], ctx.normalizer,
                                     self.cfg.train.eval_batch_size, ctx.autocast_dtype).cpu()
            self.herded[lab] = idx[herding_exemplars(feats, ctx.stream.exemplars_per_class)]

    def herded_meta(self) -> dict:
        return {str(k): v.tolist() for k, v in self.herded.items()}

    def restore_herded(self, meta: dict) -> None:
        self.herded.update({int(k): torch.tensor(v) for k, v in meta.get("herded", {}).items()})

    # ------------------------------------------------------------------------------------------ teaching
    def teaching(self, t: int) -> TeachingSet | None:
        """The teaching set for learning task t (0-based), produced by the current model as the teacher
        after tasks 0..t-1 (stage teach{t}; computed once, then read back). None on task 0 or when off."""
        if t == 0 or not self.cfg.teaching.enabled:
            return None
        ctx, rd, stage = self.ctx, self.rd, f"teach{t}"
        path = rd.file(f"teaching/task{t}.pt")
        if rd.stage_done(stage):
            return load_teaching(path, ctx.device)
        t0 = time.perf_counter()
        memory = self.memory(t)
        gen = make_generator(derive_seed(self.cfg.run.seed, f"teaching/{t}"), ctx.device)
        ts = build_teaching_set(self.model, ctx.pool, ctx.train_images[memory.to(ctx.device)], t,
                                self.cfg.teaching.neighbours, ctx.normalizer, gen,
                                self.cfg.train.eval_batch_size, ctx.autocast_dtype)
        seconds = time.perf_counter() - t0
        save_checkpoint(path, ts.state_dict(), {"task": t, "num_exemplars": int(memory.numel()),
                                                "num_selected": int(ts.pool_idx.numel())})
        rd.record("teaching", task=t, num_exemplars=int(memory.numel()), num_selected=int(ts.pool_idx.numel()),
                  pool_size=int(ctx.pool.shape[0]), seconds=round(seconds, 3))
        rd.mark_done(stage, seconds=round(seconds, 3))
        print(f"lottery teaching after task {t}: {ts.pool_idx.numel()} unlabeled images queried for "
              f"{memory.numel()} exemplars in {seconds:.2f} s")
        return TeachingSet.from_state({k: v.to(ctx.device) for k, v in ts.state_dict().items()})


    # ------------------------------------------------------------------------------------------ training
    def fit(self, t: int, schedule: Schedule, seed_tag: str, desc: str, mask: dict | None = None,
            teaching: TeachingSet | None = None, select_on: str = "val") -> TaskResult:
        """Train the current model on task t (0-based); returns the result (best and last states).

        The best epoch is chosen on the validation images of every seen class, or, with select_on="test"
        (only for prune.decision_split=test-compat), on their test images as the original did.
        """
        ctx = self.ctx
        task = ctx.stream.tasks[t]
        data = TaskData(images=ctx.train_images, labels=ctx.train_labels, new_idx=task.train_idx.to(ctx.device),
                        memory_idx=self.memory(t).to(ctx.device), val_idx=ctx.stream.val_seen(t).to(ctx.device),
                        teaching=teaching)
        if select_on == "test":
            data.val_images, data.val_labels = ctx.test_images, ctx.stream.test_labels.to(ctx.device)
            data.val_idx = torch.cat([x.test_idx for x in ctx.stream.tasks[: t + 1]]).to(ctx.device)
        self.trainer.mask = None if mask is None else {n: m.to(ctx.device) for n, m in mask.items()}
        gen = make_generator(derive_seed(self.cfg.run.seed, seed_tag), ctx.device)
        ckpt = self.epoch_checkpoint(t, schedule, seed_tag, mask, teaching, data, select_on)
        resume = self._resume(ckpt, desc, schedule)
        self.progress.start(desc, schedule.epochs, done=0 if resume is None else resume["meta"]["epoch"])
        try:
            return self.trainer.fit_task(t, data, schedule, gen, on_epoch=self.progress.update, checkpoint=ckpt,
                                         resume=resume)
        finally:
            self.progress.close()
            self.trainer.mask = None
            if ckpt is not None:   # stopped by Ctrl-C or SIGTERM: the last finished epoch is saved first
                ckpt.close(flush=isinstance(sys.exc_info()[1], KeyboardInterrupt))

    def epoch_checkpoint(self, t: int, schedule: Schedule, seed_tag: str, mask: dict | None,
                         teaching: TeachingSet | None, data: TaskData, select_on: str) -> EpochCheckpoint | None:
        """The epoch checkpoint of one training; its key is the training's seed tag, unique within a run."""
        every = self.cfg.run.checkpoint_every
        if every == 0:
            return None
        key = seed_tag.removeprefix("augment/").replace("/", "-")
        identity = {"task": t, "key": key, "epochs": schedule.epochs, "schedule": dataclasses.asdict(schedule),
                    "select_on": select_on, "mask": fingerprint_mask(mask),
                    "memory": fingerprint_tensor(data.memory_idx),
                    "teaching": "none" if teaching is None else fingerprint_tensor(teaching.pool_idx)}
        return EpochCheckpoint(self.rd.file(f"checkpoints/epoch/{key}.pt"), key, identity, every=every)

    def _resume(self, ckpt: EpochCheckpoint | None, desc: str, schedule: Schedule) -> dict | None:
        if ckpt is None:
            return None
        t0 = time.perf_counter()
        state = ckpt.load()
        if state is None:
            return None
        epoch = state["meta"]["epoch"]
        seconds = time.perf_counter() - t0
        self.rd.record("resume", key=ckpt.key, epoch=epoch, epochs=schedule.epochs, load_seconds=round(seconds, 4))
        print(f"{desc}: continuing after epoch {epoch} of {schedule.epochs} (epoch checkpoint read in {seconds:.2f} s)")
        return state

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, t: int) -> dict:
        """Test accuracy row after tasks 0..t (percent), overall and per class."""
        ctx = self.ctx
        return evaluate_seen_tasks(self.model, ctx.test_images, ctx.stream, t, ctx.normalizer,
                                   self.cfg.train.eval_batch_size, ctx.autocast_dtype)

    def decision_row(self, t: int, split: str) -> list[float]:
        """Accuracy per seen task after task t on the split decisions use: "val", or "test" (compat)."""
        if split == "test":
            return self.evaluate(t)["row"]
        ctx = self.ctx
        return task_accuracies(self.model, ctx.train_images, ctx.train_labels,
                               [task.val_idx for task in ctx.stream.tasks[: t + 1]], ctx.normalizer,
                               self.cfg.train.eval_batch_size, ctx.autocast_dtype)["row"]

    def validate(self, t: int) -> float:
        """Validation accuracy over every class seen after task t (percent): what decisions use."""
        ctx = self.ctx
        data = TaskData(ctx.train_images, ctx.train_labels, ctx.train_labels[:0], ctx.train_labels[:0],
                        ctx.stream.val_seen(t).to(ctx.device))
        return self.trainer.validate(data, t + 1)


def load_teaching(path, device) -> TeachingSet:
    """A stored teaching set, moved to the device."""
    state, _ = load_checkpoint(path)
    return TeachingSet.from_state({k: v.to(device) for k, v in state.items()})


# ------------------------------------------------------------------------------------------ runs

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


def format_matrix(R: list[list[float]], sa: list[float], forgetting: list, remaining: list[float]) -> str:
    n = len(R)
    head = "after  " + " ".join(f"{'T' + str(i + 1):>6}" for i in range(n)) + f" {'SA':>7} {'forget':>7} {'weights%':>9}"
    lines = [head, "-" * len(head)]
    for t, row in enumerate(R):
        cells = " ".join(f"{v:6.2f}" for v in row) + " " * (7 * (n - t - 1))
        f = "" if forgetting[t] is None else f"{forgetting[t]:.2f}"
        lines.append(f"T1~{t + 1:<3} {cells} {sa[t]:7.2f} {f:>7} {remaining[t]:9.2f}")
    return "\n".join(lines)


def check_format(rd: RunDir) -> None:
    """Refuse run directories written by another format version (instead of mixing their files)."""
    try:
        version = json.loads(rd.file("manifest.json").read_text()).get("format_version")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise LLTError(f"{rd.file('manifest.json')}: not a readable manifest ({e})") from None
    if version != FORMAT_VERSION:
        raise LLTError(f"{rd.path} was written by run-directory format {version}; this llt writes format "
                       f"{FORMAT_VERSION}. Start a new run (another --out or run.name) instead of mixing them")


def check_same_stream(rd: RunDir, got: dict) -> None:
    """Refuse to continue or evaluate a run whose data no longer give the stream it was made with."""
    try:
        expected = json.loads(rd.file("manifest.json").read_text()).get("stream", {})
    except (OSError, json.JSONDecodeError) as e:
        raise LLTError(f"{rd.file('manifest.json')}: not a readable manifest ({e})") from None
    changed = [k for k in ("class_order", "sha256_train_idx", "sha256_val_idx", "sha256_test_idx", "sha256_exemplars")
               if expected.get(k) != got.get(k)]
    if changed:
        raise LLTError(f"{rd.path}: the data no longer give this run's task stream ({', '.join(changed)} differ); "
                       f"point --data-dir at the data the run was made with, or start a new run")


def _precision(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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
    if rd.file("manifest.json").is_file():
        check_format(rd)
        check_same_stream(rd, stream.manifest())
    else:
        rd.write_manifest(cfg, preset, device=str(device),
                          seeds={"run": cfg.run.seed, "split": derive_seed(cfg.run.seed, "split"),
                                 "init": derive_seed(cfg.run.seed, "init"),
                                 "rule": "every random choice draws from derive_seed(run seed, purpose), purposes: "
                                         "split, exemplars/<label>, init, augment/<stage>, teaching/<task>"},
                          dataset={"name": ds.name, **ds.info()}, pool=pool_info, stream=stream.manifest())
        save_checkpoint(rd.file("stream.pt"), stream.state_dict(), stream.manifest())
    channels_last = device.type == "cuda"
    autocast = _precision(cfg, device)
    return Context(cfg=cfg, rd=rd, ds=ds, stream=stream, pool=pool, device=device,
                   normalizer=Normalizer(ds.mean, ds.std, device, channels_last=channels_last),
                   autocast_dtype=autocast, train_images=ds.train_images.to(device),
                   train_labels=stream.train_labels.to(device), test_images=ds.test_images.to(device))


def finish(ctx: Context, R: list, remaining: list, method: str | None = None, **extra) -> dict:
    """Write summary.json and print the accuracy matrix with SA, forgetting and remaining weights."""
    cfg, rd = ctx.cfg, ctx.rd
    summary = build_summary(method or cfg.run.method, ctx.ds.name, cfg.run.seed, R, remaining,
                            dataset_status=ctx.ds.provenance.get("status"), **extra)
    rd.write_json("summary.json", summary)
    print(format_matrix(summary["accuracy_matrix"], summary["sa"], summary["forgetting"], summary["remaining_weights"]))
    print(f"final SA {summary['final_sa']:.2f} | forgetting {summary['final_forgetting'] or 0:.2f} | "
          f"remaining weights {summary['remaining_weights'][-1]:.2f} % | summary: {rd.file('summary.json')}")
    return summary


def task_line(t: int, n: int, row: list[float], extra: str = "") -> str:
    return (f"task {t + 1}/{n}: test accuracy per task " + " ".join(f"{v:.2f}" for v in row)
            + f" | SA {sum(row) / len(row):.2f}" + (f" | {extra}" if extra else ""))


def open_run(run_dir: str, data_dir: str | None = None) -> tuple[RunConfig, RunDir]:
    """The config of an existing run directory (optionally with another data folder)."""
    rd = RunDir(run_dir)
    path = rd.file("manifest.json")
    if not path.is_file():
        raise LLTError(f"{run_dir} is not an llt run directory (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
        cfg = from_tree(manifest["config"], origin=str(path))
    except (json.JSONDecodeError, KeyError, TypeError, LLTError) as e:
        raise LLTError(f"{path}: not a valid llt manifest ({e})") from None
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    return cfg, rd
