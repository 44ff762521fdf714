"""Top-Down lifelong tickets (METHOD section 4, decisions 3 and 9): IMP unrolled over the tasks.

An explicit stage machine. With m_0 = all conv weights and theta_0 the initialisation, for each task t:

    teach{t-1}       the previous ticket T1~(t-1) queries the pool (lottery teaching for task t)
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
from llt.engine import Context, Engine, finish, history_record, task_line
from llt.errors import LLTError
from llt.pruning.magnitude import global_magnitude_prune
from llt.pruning.mask import Mask
from llt.runs import load_checkpoint, save_checkpoint


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


def _level_record(eng: Engine, t: int, level: int, mask: Mask, kind: str, val: float, seconds: float, **extra) -> dict:
    ev = eng.evaluate(t)
    rec = {"task": t + 1, "level": level, "kind": kind, "density": mask.density(),
           "remaining_weights": 100 * mask.density(), "per_layer_density": mask.per_layer_density(),
           "val": val, "test_row": ev["row"], "test_sa": sum(ev["row"]) / len(ev["row"]), "seconds": round(seconds, 3),
           **extra}
    eng.rd.record("level", **rec)
    return rec


def _check_zero(eng: Engine, mask: Mask, where: str) -> None:
    bad = mask.pruned_nonzero(eng.model)
    assert not bad, f"pruned weights became non-zero in {where}: {bad}"  # an internal invariant


def run_topdown(ctx: Context, progress: str = "auto") -> dict:
    cfg, rd, stream = ctx.cfg, ctx.rd, ctx.stream
    p, n = cfg.prune, stream.num_tasks
    fractions = schedule_fractions(p, n)
    per_task_epochs = [2 * cfg.train.epochs + p.finetune_epochs * max(len(f) - 1, 0) for f in fractions]
    eng = Engine(ctx, sum(per_task_epochs), progress)
    full, finetune = eng.schedule(), eng.schedule(p.finetune_epochs, p.finetune_lr, ())

    init = eng.initial_state()
    mask = Mask.ones(eng.model)
    start = init                       # where the training of the next task starts
    R, remaining = [], []
    for t in range(n):
        T = t + 1
        ticket_path = rd.file(f"checkpoints/task{T}.pt")
        if rd.stage_done(f"task{T}"):
            state, meta = load_checkpoint(ticket_path)
            eng.load(state, str(ticket_path))
            mask = Mask.load(rd.file(f"masks/task{T}.pt"), eng.model)
            start, _ = load_checkpoint(rd.file(f"checkpoints/task{T}-rewound.pt"))
            eng.restore_herded(meta)
            R.append(meta["row"])
            remaining.append(100 * mask.density())
            eng.progress.skip(per_task_epochs[t])
            print(f"task {T}: ticket finished before (stage marker present), skipping")
            continue
        t_task = time.perf_counter()
        teaching = eng.teaching(t)             # the current model is the previous ticket T1~(t-1)
        prev_mask = mask

        # level 0: the rewound previous ticket trained on task t
        train_best, train_last = rd.file(f"checkpoints/task{T}-train.pt"), rd.file(f"checkpoints/task{T}-train-last.pt")
        if rd.stage_done(f"task{T}-train"):
            best, _ = load_checkpoint(train_best)
            last, _ = load_checkpoint(train_last)
            eng.progress.skip(cfg.train.epochs)
        else:
            t0 = time.perf_counter()
            eng.load(start, "the rewound ticket")
            res = eng.fit(t, full, f"augment/td/task{T}/train", f"task {T}/{n} train", mask=mask.masks, teaching=teaching)
            _check_zero(eng, mask, f"task {T} training")
            best, last = {k: v.cpu() for k, v in res.best_state.items()}, {k: v.cpu() for k, v in res.last_state.items()}
            eng.load(best, "best state")
            save_checkpoint(train_best, best, {"task": T, "best_epoch": res.best_epoch, "best_val": res.best_val})
            save_checkpoint(train_last, last, {"task": T})
            _level_record(eng, t, 0, mask, "train", res.best_val, time.perf_counter() - t0, best_epoch=res.best_epoch,
                          epochs=history_record(res))
            rd.mark_done(f"task{T}-train")

        # levels 1..R_t: prune from the last epoch, fine-tune between rounds
        eng.load(last, "last state")
        for r, frac in enumerate(fractions[t], 1):
            lvl_state, lvl_mask = rd.file(f"checkpoints/task{T}-level{r}.pt"), rd.file(f"masks/task{T}-level{r}.pt")
            tuned = r < len(fractions[t]) and p.finetune_epochs > 0
            if rd.stage_done(f"task{T}-level{r}"):
                state, _ = load_checkpoint(lvl_state)
                eng.load(state, str(lvl_state))
                mask = Mask.load(lvl_mask, eng.model)
                if tuned:
                    eng.progress.skip(p.finetune_epochs)
                continue
            t0 = time.perf_counter()
            weights = dict(eng.model.named_parameters())
            mask = global_magnitude_prune(weights, mask, frac, allow_empty_layer=p.allow_empty_layer)
            mask.apply_(eng.model)
            if tuned:
                res = eng.fit(t, finetune, f"augment/td/task{T}/level{r}", f"task {T}/{n} level {r}",
                              mask=mask.masks, teaching=teaching)
                eng.load(res.last_state, "fine-tuned state")   # IMP continues from the last epoch
                val = res.history[-1]["val"]
            else:
                val = eng.validate(t)
            _check_zero(eng, mask, f"task {T} level {r}")
            save_checkpoint(lvl_state, eng.state(), {"task": T, "level": r})
            mask.save(lvl_mask, task=T, level=r)
            _level_record(eng, t, r, mask, "prune+finetune" if tuned else "prune", val, time.perf_counter() - t0,
                          fraction=frac)
            rd.mark_done(f"task{T}-level{r}")
        if not mask.issubset(prev_mask):        # an internal invariant: Top-Down masks only shrink
            raise AssertionError(f"task {T}: the mask grew ({mask.first_outside(prev_mask)})")

        # rewind and re-train the ticket on task t: T1~t
        t0 = time.perf_counter()
        rand = ctx.new_model(f"rewind-rand/task{T}").state_dict() if p.rewind == "rand" else None
        rewound = rewind_state({k: v.cpu() for k, v in eng.model.state_dict().items()}, mask, p.rewind, init, best,
                               {k: v.cpu() for k, v in rand.items()} if rand else None, p.full_rewind)
        save_checkpoint(rd.file(f"checkpoints/task{T}-rewound.pt"), rewound, {"task": T, "rewind": p.rewind})
        eng.load(rewound, "the rewound ticket")
        res = eng.fit(t, full, f"augment/td/task{T}/ticket", f"task {T}/{n} ticket", mask=mask.masks, teaching=teaching)
        eng.model.load_state_dict(res.best_state)
        _check_zero(eng, mask, f"task {T} ticket")
        if stream.exemplar_selection == "herding" and t < n - 1:
            eng.herd(t)
        rec = _level_record(eng, t, len(fractions[t]), mask, "ticket", res.best_val, time.perf_counter() - t0,
                            best_epoch=res.best_epoch, epochs=history_record(res))
        mask.save(rd.file(f"masks/task{T}.pt"), task=T)
        save_checkpoint(ticket_path, eng.state(), {"task": T, "row": rec["test_row"], "density": mask.density(),
                                                   "best_epoch": res.best_epoch, "best_val": res.best_val,
                                                   "herded": eng.herded_meta()})
        rd.mark_done(f"task{T}", seconds=round(time.perf_counter() - t_task, 3))
        start = rewound
        R.append(rec["test_row"])
        remaining.append(100 * mask.density())
        print(task_line(t, n, rec["test_row"], f"remaining weights {100 * mask.density():.2f} % after "
                                               f"{len(fractions[t])} rounds | {time.perf_counter() - t_task:.1f} s"))
    return finish(ctx, R, remaining, schedule=[len(f) for f in fractions], rewind=p.rewind)
