"""The class-incremental baselines' shared stage machine: one stage `task{t}` per task, on the one trainer.

A baseline (finetune, joint, replay, lwf, ewc, icarl; one module each) says only what differs between
them: which images it trains on (`new_indices`, `replays_memory`), its loss terms (`recipe`), whether a
frozen copy of the previous model teaches it (`uses_teacher`), what it keeps after a task (`after_task`,
e.g. EWC's Fisher information) and how it classifies (`evaluate`, e.g. iCaRL's nearest mean of
exemplars). Everything else is shared with the ticket methods: the stream, class order, splits,
exemplar memory, best epoch by validation, the accuracy function, records and summary, so `llt report`
compares baselines with tickets directly.

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
from llt.models import remaining_weights
from llt.pruning.mask import Mask
from llt.trainer import Recipe


class Baseline:
    """The defaults: cross-entropy on the task's own data (what `finetune` is)."""

    name = "finetune"
    replays_memory = False
    trains_on_old_data = False             # joint: all of the seen classes' training data
    uses_teacher = False
    extra_states: tuple[str, ...] = ()     # names of the states after_task returns (kept with the stage)

    def __init__(self, eng: Engine):
        self.eng, self.cfg = eng, eng.cfg

    def new_indices(self, t: int) -> torch.Tensor:
        """Training indices of task t besides the memory."""
        return self.eng.ctx.stream.tasks[t].train_idx

    def recipe(self, t: int) -> Recipe:
        return Recipe(ce_offset=self.ce_offset(t))

    def ce_offset(self, t: int) -> int:
        """Recipe.ce_offset of task t under baseline.ce_scope ('auto': local for LwF and EWC, as FACIL and
        PyCIL train them without exemplars; global for finetune)."""
        scope = self.cfg.baseline.ce_scope
        if scope == "auto":
            scope = "local" if self.name in ("lwf", "ewc") else "global"
        return t * self.eng.ctx.stream.classes_per_task if scope == "local" else 0

    @property
    def select_on(self) -> str:
        """Where the best epoch is chosen: a method without old data (no memory, no joint training) uses only
        the current task's validation images ("val-current"); the old classes' are data it is defined not
        to have. The others use the validation images of every seen class, as the tickets do."""
        return "val" if self.replays_memory or self.trains_on_old_data else "val-current"

    def after_task(self, t: int) -> dict[str, dict]:
        """Called with the best model of task t loaded; returns extra states to keep with the stage."""
        return {}

    def restore(self, t: int, extra: dict[str, dict]) -> None:
        """The kept extra states of a finished task (a rerun or resume)."""

    def evaluate(self, t: int) -> tuple[list[float], dict]:
        """(test row after task t, extra meta): the balanced branch over the seen heads."""
        return self.eng.accuracy(t)["row"], {}


def ticket_masks(run_dir: str, eng: Engine) -> list[Mask]:
    """The tickets of a finished Top-Down or Bottom-Up run, one per task, checked against the model."""
    summary = finished_run(run_dir, ("td", "bu"))
    n = eng.ctx.stream.num_tasks
    if summary["num_tasks"] != n:
        raise LLTError(f"baseline.mask_from: {run_dir} has {summary['num_tasks']} tasks, this stream {n}")
    return [Mask.load(f"{run_dir}/masks/task{t}.pt", eng.model) for t in range(1, n + 1)]


def run_baseline(ctx: Context, method: type[Baseline], progress: str = "auto") -> dict:
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
            teacher = None
            if m.uses_teacher and t > 0:            # the previous model, frozen
                teacher = copy.deepcopy(eng.model).eval().requires_grad_(False)
            res = eng.fit(t, eng.schedule(), f"augment/{m.name}/task{T}", f"task {T}/{n} {m.name}", mask=mask,
                          recipe=m.recipe(t), teacher=teacher, new_idx=m.new_indices(t), memory=m.replays_memory,
                          select_on=m.select_on)
            eng.model.load_state_dict(res.best_state)
            if mask is not None:
                assert not mask.pruned_nonzero(eng.model)
            if m.replays_memory:      # with herding, the memory of task t's classes comes from this model
                eng.herd(t, last=True)
            extra = m.after_task(t)
            row, more = m.evaluate(t)
            density = mask.density() if mask is not None else remaining_weights(eng.model) / 100
            print(task_line(t, n, row, f"best epoch {res.best_epoch} (val {res.best_val:.2f})"))
            meta = {"task": T, "row": row, "density": density, "best_epoch": res.best_epoch, "best_val": res.best_val,
                    "herded": eng.herded_meta(), **more}
            record = {k: v for k, v in meta.items() if k != "herded"}
            return Done(eng.state(), meta, extra=extra, record={**record, "epochs": history_record(res)})

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
    return finish(ctx, R, densities, mask_from=cfg.baseline.mask_from or None, **extra)
