"""Bottom-Up lifelong tickets (METHOD section 5, decisions 2 and 10) as an explicit stage machine.

A dense reference is trained class-incrementally alongside the ticket; the ticket is kept while it
suffices and re-grown from the reference when it does not. Stages (each marker written last):

    init             theta_0
    teach{k}         the dense reference of task k queries the pool (lottery teaching for task k+1)
    ref{t}           the dense reference of task t: trained from the reference of task t-1 (theta_0 for t = 1),
                     best epoch by validation
    task 1:
      task1-level{r} IMP on the reference: prune rate of the remaining weights (global magnitude), train
                     prune.finetune_epochs at prune.finetune_lr (no rewinding); the round's accuracy is the
                     best over those epochs. The rule is broken when the drop from the reference reaches
                     prune.deacc AND the sparsity reaches prune.base_sparsity: the state before that round
                     is kept. At most prune.max_rounds rounds (then the last round is kept).
    task t >= 2:
      cand{t}        the sparse candidate: the reference of task t-1 masked by the current ticket, trained
                     like the reference (same teacher, same data)
      decision       accept if SA(reference) - SA(candidate) < prune.accept_decay: the mask is unchanged
      task{t}-level{r}  otherwise re-grow from the reference of task t: round 1 prunes rate of the weights
                     OUTSIDE the ticket by the reference's magnitudes (the old ticket is never pruned), later
                     rounds prune rate of the grown part by the current weights; each round is trained as
                     above; stop when the drop exceeds deacc and the sparsity exceeds base_sparsity (the
                     previous round is kept), or at the cap (the cap is logged: Figure 4 implies every
                     re-grow of the paper ran to it)
    task{t}          the task's ticket: checkpoint, masks/task{t}.pt, the decision and the accuracies

Every decision uses the validation split (decision 2); prune.decision_split=test-compat reproduces the
original's use of the test set for the pruning decisions. The task-1 loop ends when the drop is at least
deacc and the sparsity at least base_sparsity; the re-grow loop when both are strictly above (as in the
original). Masks only grow: the mask of task t is a subset of the mask of task t+1.
"""

from __future__ import annotations

from dataclasses import dataclass

from llt.console import task_line
from llt.context import Context
from llt.methods.base import Done, Engine, finish, history_record
from llt.metrics import standard_accuracy
from llt.pruning.magnitude import global_magnitude_prune
from llt.pruning.mask import Mask
from llt.storage import load_checkpoint


def first_task_rule_broken(drop: float, sparsity: float, deacc: float, base_sparsity: float) -> bool:
    """Task-1 IMP stops when the accuracy drop reaches deacc and the sparsity reaches base_sparsity."""
    return drop >= deacc and sparsity >= base_sparsity


def regrow_rule_broken(drop: float, sparsity: float, deacc: float, base_sparsity: float) -> bool:
    """Re-growing stops when the drop exceeds deacc and the sparsity exceeds base_sparsity."""
    return drop > deacc and sparsity > base_sparsity


def accept_ticket(gap: float, accept_decay: float) -> bool:
    """Keep the current ticket when the dense reference's SA beats the candidate's by less than accept_decay."""
    return gap < accept_decay


def _sa(row: list[float]) -> float:
    return sum(row) / len(row)


@dataclass
class LoopResult:
    state: dict        # the kept state
    mask: Mask         # the kept mask
    rounds: int        # rounds kept
    capped: bool       # stopped by prune.max_rounds, not by the accuracy rule
    reason: str


class BottomUp:
    def __init__(self, ctx: Context, progress: str = "auto"):
        cfg = ctx.cfg
        self.ctx, self.cfg, self.rd, self.p = ctx, cfg, ctx.rd, cfg.prune
        self.n = ctx.stream.num_tasks
        self.split = "test" if self.p.decision_split == "test-compat" else "val"
        # an upper bound for the time estimate: every re-grow running to the cap
        per_task = 2 * cfg.train.epochs + self.p.max_rounds * self.p.finetune_epochs
        self.per_task_epochs = per_task
        self.eng = Engine(ctx, self.n * per_task, progress)

    def decision_accuracy(self, t: int) -> dict:
        """Accuracy after task t on the split decisions use (validation, or test with test-compat)."""
        return self.eng.accuracy(t, self.split)

    def trained_stage(self, stage: str, t: int, start: dict, mask: Mask | None, teaching, desc: str) -> Done:
        """Train `start` (under `mask`) on task t for train.epochs, best epoch by validation; the best state
        is left in the model. Its meta holds the test row and the decision-split row."""
        eng = self.eng

        def compute() -> Done:
            eng.load(start, f"start of {stage}")
            res = eng.fit(t, eng.schedule(), f"augment/bu/{stage}", f"task {t + 1}/{self.n} {desc}", mask=mask,
                          teaching=teaching)
            eng.model.load_state_dict(res.best_state)
            # the best epoch's validation is the decision on the validation split: reuse it, not re-evaluate
            # (an epoch checkpoint written before per-task rows were kept has none: evaluate then)
            reuse = self.split == "val" and len(res.best_row) == t + 1
            dec = {"row": res.best_row, "overall": res.best_val} if reuse else self.decision_accuracy(t)
            meta = {"task": t + 1, "row": eng.accuracy(t)["row"], "decision_row": dec["row"],
                    "decision_overall": dec["overall"], "best_epoch": res.best_epoch, "best_val": res.best_val,
                    "density": 1.0 if mask is None else mask.density()}
            return Done(eng.state(), meta, record={**meta, "epochs": history_record(res)})

        done = eng.stage(stage, compute, event=desc.split()[0], epochs=self.cfg.train.epochs)
        eng.load(done.state, stage)
        return done

    def prune_level(self, t: int, r: int, state: dict, mask: Mask, allowed: Mask | None, baseline: float,
                    teaching, broken) -> Done:
        """One round: prune within `allowed`, train, measure. meta["rule_broken"] says whether it broke the rule."""
        eng, p, T = self.eng, self.p, t + 1
        stage = f"task{T}-level{r}"

        def compute() -> Done:
            eng.load(state, f"state before {stage}")
            new_mask = global_magnitude_prune(dict(eng.model.named_parameters()), mask, p.rate, allowed=allowed,
                                              allow_empty_layer=p.allow_empty_layer)
            new_mask.apply_(eng.model)
            if p.finetune_epochs:
                res = eng.fit(t, eng.schedule(p.finetune_epochs, p.finetune_lr, ()), f"augment/bu/{stage}",
                              f"task {T}/{self.n} level {r}", mask=new_mask, teaching=teaching, select_on=self.split)
                eng.load(res.last_state, "trained state")     # no rewinding: the next round continues from here
                best = res.best_val                           # the best over this round's epochs
            else:
                best = self.decision_accuracy(t)["overall"]
            bad = new_mask.pruned_nonzero(eng.model)
            assert not bad, f"pruned weights became non-zero in {stage}: {bad}"
            sparsity = 100.0 * (1.0 - new_mask.density())
            drop = baseline - best
            meta = {"task": T, "level": r, "density": new_mask.density(), "remaining_weights": 100 * new_mask.density(),
                    "per_layer_density": new_mask.per_layer_density(), "decision_accuracy": best, "baseline": baseline,
                    "drop": drop, "sparsity": sparsity, "rule_broken": broken(drop, sparsity, p.deacc, p.base_sparsity),
                    "split": self.split, "test_row": eng.accuracy(t)["row"]}
            return Done(eng.state(), meta, mask=new_mask)

        done = eng.stage(stage, compute, event="level", epochs=p.finetune_epochs, masked=True)
        eng.load(done.state, stage)
        return done

    def prune_loop(self, t: int, state: dict, mask: Mask, allowed: Mask | None, baseline: float, teaching,
                   broken) -> LoopResult:
        """Rounds 1..max_rounds from (state, mask), pruning only within `allowed`."""
        p = self.p
        prev_state, prev_mask = state, mask
        for r in range(1, p.max_rounds + 1):
            cur = self.prune_level(t, r, prev_state, prev_mask, allowed, baseline, teaching, broken)
            rec = cur.meta
            if rec["rule_broken"] and r > 1:
                return LoopResult(prev_state, prev_mask, r - 1, False,
                                  f"stop rule at round {r} (drop {rec['drop']:.2f} points at {rec['sparsity']:.2f} % "
                                  f"sparsity): kept round {r - 1}")
            if rec["rule_broken"]:   # broken at once: there is nothing earlier to keep but the first round
                return LoopResult(cur.state, cur.mask, 1, False, "stop rule at round 1: kept round 1")
            prev_state, prev_mask = cur.state, cur.mask
        return LoopResult(prev_state, prev_mask, p.max_rounds, p.max_rounds > 0,
                          f"cap reached: kept round {p.max_rounds} of max_rounds={p.max_rounds}")

    def task(self, t: int, init: dict, ref_prev: dict | None, mask: Mask | None) -> Done:
        """Stage task{t+1}: the dense reference, then the task-1 IMP, or the candidate, the decision and a
        re-grow. Its state is the ticket's, its mask the ticket's mask."""
        eng, n, p, T = self.eng, self.n, self.p, t + 1
        if ref_prev is not None:
            eng.load(ref_prev, "the previous dense reference")    # the teacher of task t
        teaching = eng.teaching(t)
        ref = self.trained_stage(f"ref{T}", t, init if t == 0 else ref_prev, None, teaching, "reference").meta
        ref_state = eng.state()
        capped = False
        if t == 0:
            loop = self.prune_loop(t, ref_state, Mask.ones(eng.model), None, ref["decision_overall"], teaching,
                                   first_task_rule_broken)
            state, mask, capped = loop.state, loop.mask, loop.capped
            decision = f"imp: {loop.reason}" if loop.rounds else "imp: no pruning round (max_rounds=0)"
        else:
            cand = self.trained_stage(f"cand{T}", t, ref_prev, mask, teaching, "candidate").meta
            gap = _sa(ref["decision_row"]) - _sa(cand["decision_row"])
            if accept_ticket(gap, p.accept_decay):
                state = eng.state()
                decision = f"accept: SA gap {gap:.2f} < {p.accept_decay} points"
            elif p.max_rounds == 0:
                state = eng.state()
                decision = f"keep: SA gap {gap:.2f} >= {p.accept_decay} points but max_rounds=0 allows no growth"
            else:
                old = mask
                loop = self.prune_loop(t, ref_state, Mask.ones(eng.model), ~old, ref["decision_overall"],
                                       teaching, regrow_rule_broken)
                state, mask, capped = loop.state, loop.mask, loop.capped
                decision = f"grow: SA gap {gap:.2f} >= {p.accept_decay} points; {loop.reason}"
                if not old.issubset(mask):     # an internal invariant: the old ticket is never pruned
                    raise AssertionError(f"task {T}: re-growing removed ticket weights ({old.first_outside(mask)})")
        eng.load(state, "the ticket")
        row = eng.accuracy(t)["row"]
        if self.ctx.stream.exemplar_selection == "herding":
            eng.load(ref_state, "the reference")  # herding uses the reference's features
            eng.herd(t)
            eng.load(state, "the ticket")
        print(task_line(t, n, row, f"dense SA {_sa(ref['row']):.2f} | remaining weights "
                                   f"{100 * mask.density():.2f} % | {decision}"))
        meta = {"task": T, "row": row, "ref_row": ref["row"], "density": mask.density(), "decision": decision,
                "capped": capped, "herded": eng.herded_meta()}
        return Done(state, meta, mask=mask,
                    record={**{k: v for k, v in meta.items() if k != "herded"},
                            "remaining_weights": 100 * mask.density(), "per_layer_density": mask.per_layer_density()})

    # ------------------------------------------------------------------------------------------ the search
    def run(self) -> dict:
        eng, rd, n = self.eng, self.rd, self.n
        init = eng.initial_state()
        mask: Mask | None = None
        ref_prev: dict | None = None
        R, R_ref, densities, decisions, capped_tasks = [], [], [], [], []
        for t in range(n):
            T = t + 1
            done = eng.stage(f"task{T}", lambda t=t: self.task(t, init, ref_prev, mask), event="ticket",
                             epochs=self.per_task_epochs, masked=True,
                             skip_note=f"task {T}: ticket finished before (stage marker present), skipping")
            eng.restore_herded(done.meta)
            mask = done.mask
            ref_prev, _ = load_checkpoint(rd.file(f"checkpoints/ref{T}.pt"))
            meta = done.meta
            R.append(meta["row"])
            R_ref.append(meta["ref_row"])
            densities.append(meta["density"])
            decisions.append(meta["decision"])
            capped_tasks += [T] if meta["capped"] else []
        regrows = [T for T, d in enumerate(decisions, 1) if d.startswith("grow")]
        return finish(self.ctx, R, densities, decisions=decisions, first_task_hit_cap=1 in capped_tasks,
                      regrows=len(regrows), regrows_hit_cap=len([T for T in regrows if T in capped_tasks]),
                      reference_matrix=R_ref, reference_sa=standard_accuracy(R_ref), decision_split=self.split)


def run_bottomup(ctx: Context, progress: str = "auto") -> dict:
    return BottomUp(ctx, progress).run()
