"""What every method shares: the Engine (the run's one model, the exemplar memory, lottery teaching, fitting,
accuracy) and the one stage helper.

A method (dense CIL, Top-Down, Bottom-Up, re-training) is a stage machine over an Engine: it decides which
state, mask, schedule and teacher each training uses. Every unit of work is a *stage*, run through
`Engine.stage`, which owns the bookkeeping: skip it if its marker exists (reading back what it kept),
otherwise compute it, save its state, mask and extra states atomically, write its record, and write its
marker last. A rerun or `llt resume` therefore skips whatever finished, and a crash mid-stage loses only
that stage (its training continues from the last epoch checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llt.checkpointing import EpochCheckpoint, fingerprint_mask, fingerprint_tensor
from llt.config import batchnorm_setup
from llt.console import Progress, format_matrix
from llt.context import Context, load_model_state
from llt.data.augment import make_generator
from llt.data.stream import derive_seed, herding_exemplars
from llt.errors import LLTError
from llt.evaluation import accuracy
from llt.pruning.mask import Mask
from llt.runs import RunDir, build_summary, check_summary, read_records
from llt.storage import load_checkpoint, save_checkpoint
from llt.teaching import TeachingSet, build_teaching_set, extract_features
from llt.trainer import Recipe, Schedule, TaskData, TaskResult, Trainer


@dataclass
class Done:
    """What a finished stage keeps.

    state   a state_dict (model weights, or a teaching set), saved as the stage's checkpoint
    meta    JSON-able facts kept with it (accuracy row, density, best epoch, ...)
    mask    the stage's mask, saved as masks/<stage>.pt, if it has one
    extra   further state_dicts by suffix, saved as checkpoints/<stage>-<suffix>.pt
    record  fields of the stage's line in records.jsonl (written once, when the stage is computed)
    """

    state: dict | None
    meta: dict
    mask: Mask | None = None
    extra: dict[str, dict] = field(default_factory=dict)
    record: dict | None = None


def history_record(result: TaskResult) -> list[dict]:
    """Per-epoch history of a training, rounded for records.jsonl."""
    return [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in result.history]


def cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


class Engine:
    """The run's one model object (states are loaded into it), its trainer and progress display, and the
    run context (data on the device, stream, pool, run directory)."""

    def __init__(self, ctx: Context, total_epochs: int, progress: str = "auto"):
        self.ctx, self.cfg, self.rd = ctx, ctx.cfg, ctx.rd
        self.model = ctx.new_model()
        self.trainer = Trainer(self.model, ctx.normalizer, ctx.autocast_dtype,
                               eval_batch_size=ctx.eval_batch,
                               compile=ctx.cfg.train.compile and ctx.device.type == "cuda")
        self.progress = Progress(total_epochs, progress)
        self.herded: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ stages
    def stage(self, name: str, compute: Callable[[], Done], *, event: str | None = None, epochs: int = 0,
              path: str | None = None, masked: bool = False, extra: tuple[str, ...] = (),
              skip_note: str | None = None) -> Done:
        """Run stage `name` once: if its marker exists, read back what it kept (its checkpoint, with
        `masked` its mask, the `extra` states) and count its `epochs` as done; otherwise call `compute`,
        save the result, append a record of kind `event` (if given), and write the marker last.

        `path` is the checkpoint (default checkpoints/<name>.pt). The stage's wall time goes into its meta,
        record and marker."""
        rd = self.rd
        ckpt = rd.file(path or f"checkpoints/{name}.pt")
        mask_path = rd.file(f"masks/{name}.pt")
        extra_path = {s: rd.file(f"checkpoints/{name}-{s}.pt") for s in extra}
        if rd.stage_done(name):
            state, meta = load_checkpoint(ckpt)
            mask = Mask.load(mask_path, self.model) if masked else None
            self.progress.skip(epochs)
            if skip_note:
                print(skip_note)
            return Done(state, meta, mask, {s: load_checkpoint(p)[0] for s, p in extra_path.items()})
        t0 = time.perf_counter()
        done = compute()
        seconds = round(time.perf_counter() - t0, 3)
        done.meta = {**done.meta, "seconds": seconds}
        for s, p in extra_path.items():
            save_checkpoint(p, done.extra[s], {"stage": name, "part": s})
        if masked:
            done.mask.save(mask_path, stage=name)
        save_checkpoint(ckpt, done.state, done.meta)
        if event:
            rd.record(event, **{**(done.record if done.record is not None else done.meta), "seconds": seconds})
        rd.mark_done(name, seconds=seconds)
        return done

    # ------------------------------------------------------------------------------------------ model
    def load(self, state: dict, source: str) -> None:
        load_model_state(self.model, state, source)

    def state(self) -> dict:
        """A CPU copy of the model's state_dict."""
        return cpu_state(self.model.state_dict())

    def schedule(self, epochs: int | None = None, lr: float | None = None,
                 milestones: tuple[int, ...] | None = None) -> Schedule:
        t = self.cfg.train
        return Schedule(epochs=t.epochs if epochs is None else epochs, lr=t.lr if lr is None else lr,
                        milestones=t.milestones if milestones is None else milestones, gamma=t.gamma,
                        momentum=t.momentum, weight_decay=t.weight_decay, batch_size=t.batch_size,
                        temperature=self.cfg.teaching.temperature, select=t.select,
                        **dict(zip(("batchnorm", "bn_running", "bn_recalibrate"), batchnorm_setup(t))))

    def steps_per_epoch(self, t: int, batch_size: int) -> int:
        """The optimisation budget of an epoch of task t (0-based), the same for every method of one config:
        what the lottery loop takes, one pass over the task's training images and the memory's in batches
        of batch_size (task 1, no memory) or batch_size // 4 (later tasks)."""
        stream = self.ctx.stream
        n = stream.tasks[t].train_idx.numel() + stream.memory_size(t)
        return -(-n // (batch_size if t == 0 else batch_size // 4))

    def initial_state(self) -> dict:
        """theta_0, the run's initialisation (stage init); loaded into the model."""
        done = self.stage("init", lambda: Done(self.state(), {"kind": "initialisation"}), path="checkpoints/init.pt")
        self.load(done.state, "theta_0")
        return done.state

    # ------------------------------------------------------------------------------------------ memory
    def memory(self, t: int, first: int = 0) -> torch.Tensor:
        """Exemplar indices for learning task t (0-based): every class of tasks first..t-1 (first = 0: the
        whole memory; memory(t + 1, t): the exemplars of task t's classes, once chosen)."""
        stream = self.ctx.stream
        pool = self.herded if stream.exemplar_selection == "herding" else stream.exemplars
        parts = [pool[lab] for task in stream.tasks[first:t] for lab in task.labels if lab in pool]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def herd(self, t: int, last: bool = False) -> None:
        """With herding: the exemplars of task t's classes (0-based) from the current model's features (not
        for the last task, whose memory no later task uses, unless `last`)."""
        ctx = self.ctx
        if ctx.stream.exemplar_selection != "herding" or (t >= ctx.stream.num_tasks - 1 and not last):
            return
        task = ctx.stream.tasks[t]
        for lab in task.labels:
            idx = task.train_idx[ctx.stream.train_labels[task.train_idx] == lab]
            feats = extract_features(self.model, ctx.train_images[idx.to(ctx.device)], ctx.normalizer,
                                     ctx.eval_batch, ctx.autocast_dtype).cpu()
            self.herded[lab] = idx[herding_exemplars(feats, ctx.stream.exemplars_per_class)]

    def herded_meta(self) -> dict:
        return {str(k): v.tolist() for k, v in self.herded.items()}

    def restore_herded(self, meta: dict) -> None:
        self.herded.update({int(k): torch.tensor(v) for k, v in meta.get("herded", {}).items()})

    # ------------------------------------------------------------------------------------------ teaching
    def teaching(self, t: int) -> TeachingSet | None:
        """The teaching set for learning task t (0-based), produced by the current model as the teacher
        after tasks 0..t-1 (stage teach{t}). None on task 0 or when lottery teaching is off."""
        if t == 0 or not self.cfg.teaching.enabled:
            return None
        ctx = self.ctx

        def compute() -> Done:
            memory = self.memory(t)
            gen = make_generator(derive_seed(self.cfg.run.seed, f"teaching/{t}"), ctx.device)
            t0 = time.perf_counter()
            ts = build_teaching_set(self.model, ctx.pool, ctx.train_images[memory.to(ctx.device)], t,
                                    self.cfg.teaching.neighbours, ctx.normalizer, gen,
                                    ctx.eval_batch, ctx.autocast_dtype)
            facts = {"task": t, "num_exemplars": int(memory.numel()), "num_selected": int(ts.pool_idx.numel()),
                     "pool_size": int(ctx.pool.shape[0])}
            print(f"lottery teaching after task {t}: {facts['num_selected']} unlabeled images queried for "
                  f"{facts['num_exemplars']} exemplars in {time.perf_counter() - t0:.2f} s")
            return Done(cpu_state(ts.state_dict()), facts)

        done = self.stage(f"teach{t}", compute, event="teaching", path=f"teaching/task{t}.pt")
        return to_teaching_set(done.state, ctx.device)

    # ------------------------------------------------------------------------------------------ training
    def fit(self, t: int, schedule: Schedule, seed_tag: str, desc: str, mask: Mask | None = None,
            teaching: TeachingSet | None = None, select_on: str = "val", recipe: Recipe | None = None,
            teacher: torch.nn.Module | None = None, new_idx: torch.Tensor | None = None,
            memory: bool | torch.Tensor = True) -> TaskResult:
        """Train the current model on task t (0-based) under `mask` (None: dense); returns the result.

        The best epoch is chosen on the validation images of every seen class, with select_on="val-current"
        on the current task's only (baselines without old data), or, with select_on="test" (only for
        prune.decision_split=test-compat), on their test images as the original did. Baselines
        give a `recipe` (their loss terms), a frozen `teacher`, the training indices `new_idx` (default: task
        t's) and whether the exemplar memory is replayed (or the indices it replays instead).
        """
        ctx = self.ctx
        task = ctx.stream.tasks[t]
        if isinstance(memory, torch.Tensor):          # a method's own rehearsal set (ER-ACE)
            mem = memory
        else:
            mem = self.memory(t) if memory else torch.empty(0, dtype=torch.int64)
        data = TaskData(images=ctx.train_images, labels=ctx.train_labels,
                        new_idx=(task.train_idx if new_idx is None else new_idx).to(ctx.device),
                        memory_idx=mem.to(ctx.device), val_idx=ctx.stream.val_seen(t).to(ctx.device),
                        teaching=teaching, teacher=teacher,
                        val_sizes=tuple(x.val_idx.numel() for x in ctx.stream.tasks[: t + 1]),
                        steps_per_epoch=(self.steps_per_epoch(t, schedule.batch_size)
                                         if recipe is not None and recipe.step_matched else 0),
                        first_label=t * ctx.stream.classes_per_task)
        if select_on == "val-current":        # memoryless baselines: the current task's validation images only
            data.val_idx, data.val_sizes = task.val_idx.to(ctx.device), (task.val_idx.numel(),)
        elif select_on == "test":
            data.val_images, data.val_labels = ctx.test_images, ctx.stream.test_labels.to(ctx.device)
            data.val_idx = torch.cat([x.test_idx for x in ctx.stream.tasks[: t + 1]]).to(ctx.device)
            data.val_sizes = tuple(x.test_idx.numel() for x in ctx.stream.tasks[: t + 1])
        gen = make_generator(derive_seed(self.cfg.run.seed, seed_tag), ctx.device)
        ckpt = self.epoch_checkpoint(t, schedule, seed_tag, mask, teaching, data, select_on, recipe)
        resume = self._resume(ckpt, desc, schedule)
        self.progress.start(desc, schedule.epochs, done=0 if resume is None else resume["meta"]["epoch"])
        try:
            result = self.trainer.fit_task(t, data, schedule, gen, mask=mask, on_epoch=self.progress.update,
                                           checkpoint=ckpt, resume=resume, recipe=recipe)
            # one record per training (a training repeated after a crash: the last record of its key counts)
            self.rd.record("training", key=seed_tag.removeprefix("augment/"), task=t + 1, **result.budget())
            return result
        finally:
            self.progress.close()
            if ckpt is not None:   # stopped by Ctrl-C or SIGTERM: the last finished epoch is saved first
                ckpt.close(flush=isinstance(sys.exc_info()[1], KeyboardInterrupt))

    def epoch_checkpoint(self, t: int, schedule: Schedule, seed_tag: str, mask: Mask | None,
                         teaching: TeachingSet | None, data: TaskData, select_on: str,
                         recipe: Recipe | None = None) -> EpochCheckpoint | None:
        """The epoch checkpoint of one training; its key is the training's seed tag, unique within a run."""
        every = self.cfg.run.checkpoint_every
        if every == 0:
            return None
        key = seed_tag.removeprefix("augment/").replace("/", "-")
        sched = dataclasses.asdict(schedule)
        if (schedule.batchnorm, schedule.bn_running, schedule.bn_recalibrate) == ("original", "original", False):
            for k in ("batchnorm", "bn_running", "bn_recalibrate"):    # as checkpoints written before these existed
                del sched[k]
        identity = {"task": t, "key": key, "epochs": schedule.epochs, "schedule": sched,
                    "select_on": select_on, "mask": fingerprint_mask(None if mask is None else mask.masks),
                    "memory": fingerprint_tensor(data.memory_idx), "new": fingerprint_tensor(data.new_idx),
                    "recipe": None if recipe is None else [recipe.loss, recipe.distill, recipe.temperature,
                                                           recipe.penalty is not None, recipe.ce_offset,
                                                           recipe.batching, data.steps_per_epoch]
                    + ([] if recipe.terms == () and recipe.memory_batches == 1 and not recipe.batch_size
                       else [list(recipe.terms), recipe.heads, recipe.memory_batches, recipe.batch_size]),
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

    # ------------------------------------------------------------------------------------------ accuracy
    def accuracy(self, t: int, split: str = "test") -> dict:
        """The current model's accuracy after tasks 0..t on `split` ("test": the reported accuracy-matrix row;
        "val": the validation images decisions use): {"row": percent per seen task, "overall": percent over
        every seen class, "per_class": percent per label}."""
        ctx = self.ctx
        if split == "test":
            images, labels, sets = ctx.test_images, ctx.stream.test_labels, [x.test_idx for x in ctx.stream.tasks[: t + 1]]
        elif split == "val":
            images, labels, sets = ctx.train_images, ctx.train_labels, [x.val_idx for x in ctx.stream.tasks[: t + 1]]
        else:
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        return accuracy(self.model, images, labels, sets, ctx.normalizer, ctx.eval_batch,
                        ctx.autocast_dtype)


def to_teaching_set(state: dict, device) -> TeachingSet:
    return TeachingSet.from_state({k: v.to(device) for k, v in state.items()})


def load_teaching(path, device) -> TeachingSet:
    """A stored teaching set, moved to the device."""
    return to_teaching_set(load_checkpoint(path)[0], device)


def training_budget(rd: RunDir, num_tasks: int) -> list[dict]:
    """Per task, what its trainings consumed (from the run's "training" records; a training repeated after a
    crash counts once, by its last record): trainings, epochs, SGD steps, steps per epoch and the new, memory
    and unlabeled images the steps drew."""
    last = {r["key"]: r for r in read_records(rd.file("records.jsonl")) if r.get("event") == "training" and "key" in r}
    keys = ("epochs", "steps", "new_images", "memory_images", "unlabeled_images")
    out = [{"trainings": 0, "steps_per_epoch": 0, **dict.fromkeys(keys, 0)} for _ in range(num_tasks)]
    for r in last.values():
        if isinstance(r.get("task"), int) and 1 <= r["task"] <= num_tasks:
            b = out[r["task"] - 1]
            b["trainings"] += 1
            b["steps_per_epoch"] = max(b["steps_per_epoch"], int(r.get("steps_per_epoch", 0)))
            for k in keys:
                b[k] += int(r.get(k, 0))
    return out


def finish(ctx: Context, R: list, densities: list[float], method: str | None = None, **extra) -> dict:
    """Write summary.json (with the training budget per task) and print the accuracy matrix with SA,
    forgetting and remaining weights."""
    cfg, rd = ctx.cfg, ctx.rd
    summary = build_summary(method or cfg.run.method, ctx.ds.name, cfg.run.seed, R, densities,
                            dataset_status=ctx.ds.provenance.get("status"),
                            budget=training_budget(rd, len(R)), **extra)
    rd.write_json("summary.json", summary)
    print(format_matrix(summary["accuracy_matrix"], summary["sa"], summary["forgetting"], summary["remaining_weights"]))
    la = summary["mean_learning_accuracy_incremental"]
    print(f"final SA {summary['final_sa']:.2f} | learning accuracy (tasks 2..{len(R)}) "
          f"{'n/a' if la is None else f'{la:.2f}'} | forgetting {summary['final_forgetting'] or 0:.2f} | "
          f"remaining weights {summary['remaining_weights'][-1]:.2f} % | summary: {rd.file('summary.json')}")
    return summary


def finished_run(run_dir: str | Path, methods: tuple[str, ...]) -> dict:
    """The summary of a finished run of one of `methods`; a clear error otherwise."""
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
    if summary["method"] not in methods:
        raise LLTError(f"{run_dir} is a finished run of method {summary['method']!r}, not a ticket run "
                       f"({' or '.join(repr(m) for m in methods)}: Top-Down or Bottom-Up)")
    return summary
