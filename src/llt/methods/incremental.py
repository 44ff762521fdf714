"""THE class-incremental stage loop: dense CIL and every baseline, one stage `task{t}` per task.

A method here (dense CIL in llt.methods.dense; finetune, joint, replay, derpp/der, erace, lwf, ewc, icarl,
one module each) says only what differs between them: which images it trains on (`new_indices`; what its
memory batches replay, `rehearsal`: the exemplar memory when its registry entry has one), its loss
(`recipe`: the Recipe's terms, or a `loss_fn` of its own over the loop's Step; None: the original's
five-term loss with lottery teaching), what it keeps after a task (`after_task`, e.g. EWC's Fisher
information, DER's stored logits) and how it classifies (`evaluate`, e.g. iCaRL's nearest mean of
exemplars). What it *is* (memory, old data, a frozen teacher, cross-entropy scope, batching, step budget)
is its registry entry, read here, never restated by the class. Everything else happens here, once for all
of them: the stream, class order, splits, the exemplar memory (herded from the task's model after each
task when data.exemplar_selection=herding), the optimisation budget (Engine.fit: the same SGD steps per
epoch for every method but joint, the upper bound, unless baseline.steps=pass), the epoch selection
(`select_on`), the accuracy function, records and summary, so `llt report` compares them directly.

With `baseline.mask_from=RUN_DIR` (a finished Top-Down or Bottom-Up run) task t trains under that run's
ticket of task t: `replay` on a ticket, for instance.
"""

from __future__ import annotations

import copy

import torch

from llt.console import task_line
from llt.context import Context
from llt.errors import LLTError
from llt.methods.base import Done, Engine, finish, finished_run, history_record
from llt.registry import REGISTRY, TICKET_SEARCHES
from llt.models import remaining_weights
from llt.pruning.mask import Mask
from llt.trainer import Recipe


class Incremental:
    """The defaults: cross-entropy on the task's own data (what `finetune` is). What the method is (its memory,
    old data, teacher, cross-entropy scope, batching, step budget) is its registry entry, `self.info`, the
    entry of run.method; a subclass keeps only its formula."""

    extra_states: tuple[str, ...] = ()     # names of the states after_task returns (kept with the stage)

    def __init__(self, eng: Engine):
        self.eng, self.cfg = eng, eng.cfg
        self.info = REGISTRY[eng.cfg.run.method]
        self.name = self.info.name

    @classmethod
    def run(cls, ctx: Context, progress: str = "auto") -> dict:
        return run_incremental(ctx, cls, progress)

    def seed_tag(self, T: int) -> str:
        return f"augment/{self.name}/task{T}"

    def desc(self, T: int, n: int) -> str:
        """The progress label of task T's training."""
        return f"task {T}/{n} {self.name}"

    def new_indices(self, t: int) -> torch.Tensor:
        """Training indices of task t besides the memory."""
        return self.eng.ctx.stream.tasks[t].train_idx

    def rehearsal(self, t: int) -> bool | torch.Tensor:
        """What the memory batches of task t replay: True, the exemplar memory of the old classes (methods
        whose registry entry has a memory); False, nothing; or a tensor of training indices."""
        return self.info.memory

    def teaching(self, t: int):
        """The lottery-teaching set of task t (dense CIL only)."""
        return None

    def recipe(self, t: int) -> Recipe | None:
        return Recipe(ce_offset=self.ce_offset(t), batching=self.memory_batching, **self.budget())

    def budget(self) -> dict:
        """Recipe fields of the step budget: the lottery loop's steps (baseline.steps=matched, unless the registry
        entry says the method is not step-matched: joint), or one pass over its own data in batches of
        train.batch_size."""
        matched = self.info.step_matched and self.cfg.baseline.steps == "matched"
        return {"step_matched": matched, "batch_size": 0 if matched else self.cfg.train.batch_size}

    @property
    def memory_batching(self) -> str:
        """baseline.replay_batching resolved for this method ('auto': the first of its registry entry's)."""
        mode = self.cfg.baseline.replay_batching
        return self.info.batching[0] if mode == "auto" else mode

    def ce_offset(self, t: int) -> int:
        """Recipe.ce_offset of task t under baseline.ce_scope ('auto': local for LwF and EWC, as FACIL and
        PyCIL train them without exemplars; global for finetune)."""
        scope = self.cfg.baseline.ce_scope
        if scope == "auto":
            scope = self.info.ce_scope
        return t * self.eng.ctx.stream.classes_per_task if scope == "local" else 0

    @property
    def select_on(self) -> str:
        """Where the best epoch is chosen: a method without old data (no memory, no joint training) uses only
        the current task's validation images ("val-current"); the old classes' are data it is defined not
        to have. The others use the validation images of every seen class, as the tickets do."""
        return "val" if self.info.memory or self.info.old_data else "val-current"

    def after_task(self, t: int) -> dict[str, dict]:
        """Called with the kept model of task t loaded; returns extra states to keep with the stage."""
        return {}

    def restore(self, t: int, extra: dict[str, dict]) -> None:
        """The kept extra states of a finished task (a rerun or resume)."""

    def evaluate(self, t: int) -> tuple[dict, dict]:
        """(Engine.accuracy of the test split after task t, extra meta): the balanced branch, seen heads."""
        return self.eng.accuracy(t), {}


def ticket_masks(run_dir: str, eng: Engine) -> list[Mask]:
    """The tickets of a finished Top-Down or Bottom-Up run, one per task, checked against the model."""
    summary = finished_run(run_dir, TICKET_SEARCHES)
    n = eng.ctx.stream.num_tasks
    if summary["num_tasks"] != n:
        raise LLTError(f"baseline.mask_from: {run_dir} has {summary['num_tasks']} tasks, this stream {n}")
    return [Mask.load(f"{run_dir}/masks/task{t}.pt", eng.model) for t in range(1, n + 1)]


def run_incremental(ctx: Context, method: type[Incremental], progress: str = "auto") -> dict:
    cfg, n = ctx.cfg, ctx.stream.num_tasks
    eng = Engine(ctx, n * cfg.train.epochs, progress)
    m = method(eng)
    masks = ticket_masks(cfg.baseline.mask_from, eng) if cfg.baseline.mask_from else None
    eng.initial_state()
    R, densities, extra_rows = [], [], []
    for t in range(n):
        T = t + 1
        mask = None if masks is None else masks[t]

        def compute(t=t, T=T, mask=mask) -> Done:
            teaching = m.teaching(t)
            teacher = None
            if m.info.teacher and t > 0:            # the previous model, frozen
                teacher = copy.deepcopy(eng.model).eval().requires_grad_(False)
            recipe = m.recipe(t)
            res = eng.fit(t, eng.schedule(), m.seed_tag(T), m.desc(T, n), mask=mask, teaching=teaching,
                          recipe=recipe, teacher=teacher, new_idx=m.new_indices(t), memory=m.rehearsal(t),
                          select_on=m.select_on)
            eng.model.load_state_dict(res.best_state)
            if mask is not None:
                assert not mask.pruned_nonzero(eng.model)
            if m.info.memory:         # with herding, the memory of task t's classes comes from this model
                eng.herd(t, last=True)
            extra = m.after_task(t)
            ev, more = m.evaluate(t)
            row = ev["row"]
            density = mask.density() if mask is not None else remaining_weights(eng.model) / 100
            print(task_line(t, n, row, f"best epoch {res.best_epoch} (val {res.best_val:.2f})"))
            meta = {"task": T, "row": row, "per_class": ev.get("per_class"), "density": density,
                    "best_epoch": res.best_epoch, "best_val": res.best_val, "herded": eng.herded_meta(), **more}
            record = {k: v for k, v in meta.items() if k != "herded"}
            return Done(eng.state(), meta, extra=extra, record={**record, "sa": sum(row) / len(row),
                                                                 "budget": res.budget(),
                                                                 "epochs": history_record(res)})

        done = eng.stage(f"task{T}", compute, event="task", epochs=cfg.train.epochs, extra=m.extra_states,
                         skip_note=f"task {T}: finished before (stage marker present), skipping")
        eng.load(done.state, f"the model of task {T}")
        eng.restore_herded(done.meta)
        m.restore(t, done.extra)
        R.append(done.meta["row"])
        densities.append(done.meta["density"])
        extra_rows.append({k: v for k, v in done.meta.items() if k.endswith("_row")})
    extra = {}
    for key in sorted({k for r in extra_rows for k in r}):          # e.g. iCaRL's network_row
        extra[key.removesuffix("_row") + "_matrix"] = [r[key] for r in extra_rows]
    if m.info.family == "baseline":
        extra["mask_from"] = cfg.baseline.mask_from or None
    return finish(ctx, R, densities, **extra)
