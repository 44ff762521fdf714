"""Top-Down lifelong tickets (METHOD section 4, decisions 3 and 9): IMP unrolled over the tasks.

An explicit stage machine. With m_0 = all conv weights and theta_0 the initialisation, for each task t:

    teach{t-1}       the teacher of task t queries the pool (lottery teaching for task t); prune.td_teacher:
                     ticket    the previous ticket T1~(t-1), re-trained on task t-1 (the default)
                     original  the model trained on task t-1 under the mask before it (level 0 of task t-1;
                               for task 2 the dense task-1 model), as the original's main_TD.py does
    task{t}-train    level 0: the rewound previous ticket (m_{t-1}, theta_0 for t = 1) trained on task t for
                     train.epochs; checkpoints of the best (validation) and the last epoch
    task{t}-level{r} level r = 1..R_t: prune prune.rate of the remaining weights by global magnitude of the
                     current weights, starting from the LAST epoch of level 0; fine-tune prune.finetune_epochs
                     at the constant prune.finetune_lr after every round but the last (as in the original)
    task{t}          rewind the conv weights (prune.rewind: zero = theta_0, best = the best epoch of level 0,
                     rand = a fresh random initialisation, finetune = keep), keep BatchNorm and heads unless
                     prune.full_rewind, and re-train the ticket m_t on task t for train.epochs: this is the
                     ticket reported as T1~t (Figure 4's labelling), and the teacher of task t+1

The rewound state of task t is also where the training of task t+1 starts (the original trains the
rewound ticket on the next task). Every stage writes its artifacts, a record per (task, level), and its
marker last; a rerun skips finished stages. Masks only shrink: m_t is a subset of m_{t-1}.
"""

from __future__ import annotations

import time

from llt.config import PruneSection
from llt.console import task_line
from llt.context import Context
from llt.errors import LLTError
from llt.methods.base import Done, Engine, cpu_state, finish, history_record
from llt.pruning.magnitude import global_magnitude_prune
from llt.pruning.mask import Mask
from llt.storage import load_checkpoint


def schedule_fractions(p: PruneSection, num_tasks: int) -> list[list[float]]:
    """Per task, the fraction of the remaining weights each pruning round removes.

    From td_rounds: that many rounds of `rate`. From td_densities: rounds of `rate` while they do not go
    below the target, then one smaller round that lands on it (CIFAR-100's last step, 13.42 % -> 9.66 %,
    becomes a 20 % round and a 10 % round; METHOD section 8.1 leaves open whether the paper used that or
    a single 28 % step).
    """
    if p.td_rounds is None and p.td_densities is None:
        raise LLTError("Top-Down needs a schedule: prune.td_rounds (rounds per task) or prune.td_densities "
                       "(target density per task)")
    sched = p.td_rounds if p.td_rounds is not None else p.td_densities
    key = "prune.td_rounds" if p.td_rounds is not None else "prune.td_densities"
    if len(sched) != num_tasks:
        raise LLTError(f"{key} has {len(sched)} entries but the stream has {num_tasks} tasks (one entry per task)")
    if p.td_rounds is not None:
        if any(r < 0 for r in p.td_rounds):
            raise LLTError(f"prune.td_rounds: round counts must be non-negative, got {list(p.td_rounds)}")
        return [[p.rate] * r for r in p.td_rounds]
    out, current = [], 1.0
    for target in p.td_densities:
        if not 0 < target <= current + 1e-12:
            raise LLTError(f"prune.td_densities must be in (0, 1] and must not increase, got {list(p.td_densities)}")
        fractions = []
        while current * (1 - p.rate) >= target - 1e-9:
            fractions.append(p.rate)
            current *= 1 - p.rate
        if current > target + 1e-9:
            fractions.append(1 - target / current)
            current = target
        out.append(fractions)
    return out


def rewind_state(pruned: dict, mask: Mask, mode: str, init: dict, best: dict, rand: dict, full: bool) -> dict:
    """The state a ticket restarts from: conv weights from the rewind source (masked), everything else
    (BatchNorm, heads) from the pruned model, or from the source too with `full`."""
    source = {"zero": init, "best": best, "rand": rand, "finetune": pruned}[mode]
    conv = set(mask.names())
    out = {}
    for k, v in pruned.items():
        take = source if (k in conv or full) else pruned
        out[k] = take[k].clone()
        if k in conv:
            out[k] = out[k] * mask[k].to(out[k].dtype)
    return out


def _level_record(eng: Engine, t: int, level: int, mask: Mask, kind: str, val: float, **extra) -> dict:
    row = eng.accuracy(t)["row"]
    return {"task": t + 1, "level": level, "kind": kind, "density": mask.density(),
            "remaining_weights": 100 * mask.density(), "per_layer_density": mask.per_layer_density(),
            "val": val, "test_row": row, "test_sa": sum(row) / len(row), **extra}


def _check_zero(eng: Engine, mask: Mask, where: str) -> None:
    bad = mask.pruned_nonzero(eng.model)
    assert not bad, f"pruned weights became non-zero in {where}: {bad}"  # an internal invariant


def run_topdown(ctx: Context, progress: str = "auto") -> dict:
    cfg, stream = ctx.cfg, ctx.stream
    p, n = cfg.prune, stream.num_tasks
    fractions = schedule_fractions(p, n)
    per_task_epochs = [2 * cfg.train.epochs + p.finetune_epochs * max(len(f) - 1, 0) for f in fractions]
    eng = Engine(ctx, sum(per_task_epochs), progress)
    full, finetune = eng.schedule(), eng.schedule(p.finetune_epochs, p.finetune_lr, ())

    init = eng.initial_state()
    mask = Mask.ones(eng.model)
    start = init                       # where the training of the next task starts
    teacher = None                     # the state that teaches the next task
    R, densities = [], []
    for t in range(n):
        T = t + 1

        def level0(t=t, T=T, teaching=None, mask=None) -> Done:
            """The rewound previous ticket trained on task t: best (validation) and last epoch."""
            eng.load(start, "the rewound ticket")
            res = eng.fit(t, full, f"augment/td/task{T}/train", f"task {T}/{n} train", mask=mask, teaching=teaching)
            _check_zero(eng, mask, f"task {T} training")
            best = cpu_state(res.best_state)
            eng.load(best, "best state")
            rec = _level_record(eng, t, 0, mask, "train", res.best_val, best_epoch=res.best_epoch,
                                epochs=history_record(res))
            return Done(best, {"task": T, "best_epoch": res.best_epoch, "best_val": res.best_val},
                        extra={"last": cpu_state(res.last_state)}, record=rec)

        def level(r, frac, t=t, T=T, teaching=None, mask=None) -> Done:
            """Round r: prune from the current state, fine-tune unless it is the task's last round."""
            tuned = r < len(fractions[t]) and p.finetune_epochs > 0
            new = global_magnitude_prune(dict(eng.model.named_parameters()), mask, frac,
                                         allow_empty_layer=p.allow_empty_layer)
            new.apply_(eng.model)
            if tuned:
                res = eng.fit(t, finetune, f"augment/td/task{T}/level{r}", f"task {T}/{n} level {r}",
                              mask=new, teaching=teaching)
                eng.load(res.last_state, "fine-tuned state")   # IMP continues from the last epoch
                val = res.history[-1]["val"]
            else:
                val = eng.accuracy(t, "val")["overall"]
            _check_zero(eng, new, f"task {T} level {r}")
            rec = _level_record(eng, t, r, new, "prune+finetune" if tuned else "prune", val, fraction=frac)
            return Done(eng.state(), {"task": T, "level": r}, mask=new, record=rec)

        def ticket_stage(t=t, T=T) -> Done:
            nonlocal mask
            if teacher is not None:
                eng.load(teacher, "the teacher")
            teaching = eng.teaching(t)
            prev_mask = mask
            train = eng.stage(f"task{T}-train", lambda: level0(teaching=teaching, mask=prev_mask), event="level",
                              epochs=cfg.train.epochs, extra=("last",))
            eng.load(train.extra["last"], "last state")       # pruning starts from the last epoch
            for r, frac in enumerate(fractions[t], 1):
                tuned = r < len(fractions[t]) and p.finetune_epochs > 0
                lvl = eng.stage(f"task{T}-level{r}", lambda r=r, frac=frac: level(r, frac, teaching=teaching, mask=mask),
                                event="level", epochs=p.finetune_epochs if tuned else 0, masked=True)
                eng.load(lvl.state, f"task {T} level {r}")
                mask = lvl.mask
            if not mask.issubset(prev_mask):        # an internal invariant: Top-Down masks only shrink
                raise AssertionError(f"task {T}: the mask grew ({mask.first_outside(prev_mask)})")

            # rewind and re-train the ticket on task t: T1~t
            t0 = time.perf_counter()
            rand = cpu_state(ctx.new_model(f"rewind-rand/task{T}").state_dict()) if p.rewind == "rand" else None
            rewound = rewind_state(eng.state(), mask, p.rewind, init, train.state, rand, p.full_rewind)
            eng.load(rewound, "the rewound ticket")
            res = eng.fit(t, full, f"augment/td/task{T}/ticket", f"task {T}/{n} ticket", mask=mask, teaching=teaching)
            eng.model.load_state_dict(res.best_state)
            _check_zero(eng, mask, f"task {T} ticket")
            eng.herd(t)
            rec = _level_record(eng, t, len(fractions[t]), mask, "ticket", res.best_val, best_epoch=res.best_epoch,
                                epochs=history_record(res))
            print(task_line(t, n, rec["test_row"], f"remaining weights {100 * mask.density():.2f} % after "
                                                   f"{len(fractions[t])} rounds | {time.perf_counter() - t0:.1f} s"))
            return Done(eng.state(), {"task": T, "row": rec["test_row"], "density": mask.density(),
                                      "best_epoch": res.best_epoch, "best_val": res.best_val,
                                      "herded": eng.herded_meta()},
                        mask=mask, extra={"rewound": rewound}, record=rec)

        done = eng.stage(f"task{T}", ticket_stage, event="level", epochs=per_task_epochs[t], masked=True,
                         extra=("rewound",), skip_note=f"task {T}: ticket finished before (stage marker present), skipping")
        eng.load(done.state, f"the ticket of task {T}")
        eng.restore_herded(done.meta)
        mask, start = done.mask, done.extra["rewound"]
        if T < n:
            teacher = (done.state if p.td_teacher == "ticket"
                       else load_checkpoint(ctx.rd.file(f"checkpoints/task{T}-train.pt"))[0])
        R.append(done.meta["row"])
        densities.append(done.meta["density"])
    return finish(ctx, R, densities, schedule=[len(f) for f in fractions], rewind=p.rewind, teacher=p.td_teacher)
