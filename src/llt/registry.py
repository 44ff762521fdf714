"""The one registry of method names: every `run.method`, every method a summary can name, their labels and
what each needs. Config validation, the driver, `llt retrain`, `llt study` and `llt report` all read it
(tests/test_registry.py checks that no other list of method names remains).

Every runnable method is reached the same way: `REGISTRY[name].runner()` is a callable
`(ctx, progress) -> summary` (a stage machine over llt.methods.base.Engine). The modules are imported only
when a method runs, so reading the registry (config validation, reports) imports no training code.

Families:
    stream     builds and describes the task stream only
    dense      dense class-incremental learning with lottery teaching (the tickets' dense counterpart)
    ticket     a lifelong-ticket search (Top-Down, Bottom-Up)
    retrained  the masks of a ticket run re-trained in isolation (`llt retrain`: TR-BU, TR-TD, the controls);
               never a run.method
    baseline   a class-incremental baseline (docs/baselines.md)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str                 # run.method and summary["method"]
    label: str                # how reports name it
    family: str
    target: str = ""          # "module:attribute[.attribute]" of its runner; "" when it is not a run.method
    memory: bool = False      # replays the exemplar memory of the old classes
    old_data: bool = False    # trains on the old classes' own training data (joint)
    source: str = ""          # retrained: the ticket method whose masks it re-trains
    retrains: bool = False    # with prune.retrain_after, its tickets are re-trained from theta_0 after it (TR-BU)
    keeps_reference: bool = False   # keeps a dense reference per task (`llt retrain --init reference` needs one)
    fused: bool = False       # trains with the lottery loop's fused step (balanced batch, lottery teaching)
    trains: bool = True       # False: builds and describes the stream only (it reads the pool to describe it)
    teacher: bool = False     # a frozen copy of the previous model teaches it (LwF, iCaRL)
    ce_scope: str = "global"  # baseline.ce_scope=auto: "local" (the current task's classes) or "global" (seen)
    batching: tuple[str, ...] = ("concat", "balanced")   # baseline.replay_batching it accepts; the first is auto's
    step_matched: bool = True  # the lottery loop's SGD steps per epoch; False: one pass over its own data (joint)
    classifier: str = "network"    # how it classifies: the network's output, or "nme" (nearest mean of exemplars)
    masks: str = ""           # a ticket search's masks over tasks: "shrink" (Top-Down) or "grow" (Bottom-Up)
    task_schedule: bool = False    # reads prune.td_rounds / td_densities (one entry per task)
    reference: bool = False   # every other method of a report is compared with it seed by seed (paired differences)
    stored_logits: bool = False    # keeps the logits of each exemplar from when it entered the memory (DER)

    @property
    def runnable(self) -> bool:
        return bool(self.target)

    def runner(self) -> Callable:
        """The callable (ctx, progress) -> summary that runs this method."""
        if not self.target:
            raise ValueError(f"{self.name} is not a run.method (it names re-trainings, made by `llt retrain`)")
        module, attr = self.target.split(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("stream", "Stream", "stream", "llt.methods.driver:describe_stream", trains=False),
    Method("cil", "Dense", "dense", "llt.methods.dense:DenseCIL.run", memory=True, fused=True, reference=True),
    Method("td", "Top-Down", "ticket", "llt.methods.topdown:run_topdown", memory=True, fused=True, masks="shrink",
           task_schedule=True),
    Method("bu", "Bottom-Up", "ticket", "llt.methods.bottomup:run_bottomup", memory=True, retrains=True,
           keeps_reference=True, fused=True, masks="grow"),
    Method("trtd", "TR-TD", "retrained", memory=True, source="td", fused=True),
    Method("trbu", "TR-BU", "retrained", memory=True, source="bu", fused=True),
    Method("finetune", "Fine-tune", "baseline", "llt.methods.finetune:Finetune.run"),
    Method("joint", "Joint (upper bound)", "baseline", "llt.methods.joint:Joint.run", old_data=True,
           step_matched=False),
    Method("replay", "Replay", "baseline", "llt.methods.replay:Replay.run", memory=True,
           batching=("balanced", "concat"), reference=True),
    Method("derpp", "DER++", "baseline", "llt.methods.derpp:DERpp.run", memory=True, batching=("balanced",),
           stored_logits=True),
    Method("der", "DER", "baseline", "llt.methods.derpp:DER.run", memory=True, batching=("balanced",),
           stored_logits=True),
    Method("erace", "ER-ACE", "baseline", "llt.methods.erace:ERACE.run", memory=True, batching=("balanced",)),
    Method("lwf", "LwF", "baseline", "llt.methods.lwf:LwF.run", teacher=True, ce_scope="local"),
    Method("ewc", "EWC", "baseline", "llt.methods.ewc:EWC.run", ce_scope="local"),
    Method("icarl", "iCaRL", "baseline", "llt.methods.icarl:ICaRL.run", memory=True, teacher=True,
           classifier="nme"),
)}


def names(*families: str) -> tuple[str, ...]:
    """Method names of the given families, in registry order (all families when none is given)."""
    return tuple(n for n, m in REGISTRY.items() if not families or m.family in families)


RUN_METHODS = tuple(n for n, m in REGISTRY.items() if m.runnable)     # the choices of run.method
TICKET_SEARCHES = names("ticket")                                     # td, bu
TICKET_METHODS = names("ticket", "retrained")                         # every run whose result is a ticket
BASELINES = names("baseline")


def label(name: str) -> str:
    m = REGISTRY.get(name)
    return m.label if m else name


# Re-training a ticket run's masks in isolation (llt retrain, a study's derived steps, the report's variants)
RETRAIN_INITS = ("original", "reference", "random")    # theta_0; the dense reference of task t-1; fresh random
RANDOM_MASKS = ("random", "layerwise-random")           # the lottery controls' masks (llt.pruning.controls)
RETRAIN_MASKS = ("ticket", *RANDOM_MASKS)


def retrain_name(source_run_name: str, init: str, mask: str) -> str:
    """The run directory name of a re-training of the ticket run `source_run_name`."""
    return f"{source_run_name}-retrain-{init}" + ("" if mask == "ticket" else f"-{mask}")


def search_of(name: str) -> str:
    """The ticket search a ticket method's masks come from (trbu -> bu; bu -> bu)."""
    return REGISTRY[name].source or name


def retrained_name(source: str) -> str:
    """The summary method of a re-training of a `source` ticket run (bu -> trbu)."""
    for m in REGISTRY.values():
        if m.family == "retrained" and m.source == source:
            return m.name
    raise ValueError(f"{source!r} is not a ticket search ({', '.join(TICKET_SEARCHES)})")


def check_config(cfg) -> list[tuple[str, str]]:
    """The method-specific rules of a RunConfig: (key, message) for each one broken."""
    m, b, d = REGISTRY[cfg.run.method], cfg.baseline, cfg.data
    out = []
    if m.family == "baseline" and m.memory and d.exemplars_per_class < 1:
        out.append(("data.exemplars_per_class", f"run.method={m.name} replays an exemplar memory: needs at least 1 "
                                                f"exemplar per class, got {d.exemplars_per_class}"))
    if b.ce_scope != "auto" and not (m.family == "baseline" and not m.memory and not m.old_data):
        out.append(("baseline.ce_scope", f"applies to {', '.join(memoryless_baselines())} (no old data in "
                                         f"their batches), not to run.method={m.name}"))
    if b.steps != "matched" and m.family != "baseline":
        out.append(("baseline.steps", f"applies to the baselines ({', '.join(BASELINES)}), not to run.method={m.name}, "
                                      f"which takes the lottery loop's steps"))
    if b.mask_from and m.family != "baseline":
        out.append(("baseline.mask_from", f"applies to the baselines ({', '.join(BASELINES)}), not to "
                                          f"run.method={m.name}"))
    if cfg.train.select != "best" and m.family not in ("dense", "baseline"):
        out.append(("train.select", f"last applies to dense CIL and the baselines (the class-incremental loop); the ticket "
                                    f"searches decide on the best epoch of each training, not to run.method={m.name}"))
    if b.replay_batching != "auto" and not (m.family == "baseline" and m.memory):
        out.append(("baseline.replay_batching", f"applies to the baselines that replay a memory "
                                                f"({', '.join(n for n in BASELINES if REGISTRY[n].memory)}), not "
                                                f"to run.method={m.name}"))
    elif b.replay_batching not in ("auto", *m.batching):
        out.append(("baseline.replay_batching", f"run.method={m.name} draws its memory batches beside the new "
                                                f"batch: only {' or '.join(m.batching)}"))
    if m.name == "der" and b.der_beta != type(b)().der_beta:
        out.append(("baseline.der_beta", f"run.method={m.name} is DER++ with beta = 0 (no labelled replay term); "
                                         f"set baseline.der_beta with run.method=derpp"))
    if not m.stored_logits and (b.der_alpha, b.der_beta, b.der_logits) != (type(b)().der_alpha, type(b)().der_beta,
                                                                           type(b)().der_logits):
        out.append(("baseline.der_alpha", f"baseline.der_alpha, der_beta and der_logits apply to "
                                          f"{', '.join(n for n in BASELINES if REGISTRY[n].stored_logits)}, not "
                                          f"to run.method={m.name}"))
    t = cfg.train
    bn = ("batchnorm", "bn_running", "bn_recalibrate")
    if not m.fused and m.family != "stream" and any(getattr(t, f) != getattr(type(t)(), f) for f in bn):
        out.append(("train.batchnorm", f"train.batchnorm, bn_running and bn_recalibrate apply to the lottery loop's fused "
                                       f"step ({', '.join(n for n, x in REGISTRY.items() if x.fused and x.runnable)}), "
                                       f"not to run.method={m.name}, which normalises each batch as one"))
    return out


FAMILY_HELP = {"stream": "builds and describes the task stream only",
               "dense": "dense class-incremental learning with lottery teaching",
               "ticket": "lifelong-ticket searches", "baseline": "class-incremental baselines"}


def method_help() -> str:
    """run.method's help text, from the registry."""
    parts = []
    for fam, what in FAMILY_HELP.items():
        ms = [m for m in REGISTRY.values() if m.family == fam and m.runnable]
        parts.append(f"{what}: " + ", ".join(f"'{m.name}'" + ("" if m.label.lower() == m.name else f" ({m.label})")
                                             for m in ms))
    return "; ".join(parts)


def estimate_epochs(cfg) -> int:
    """Training epochs a run will take (an upper bound for Bottom-Up: every re-grow to the cap)."""
    n, m = cfg.data.num_tasks or 5, REGISTRY[cfg.run.method]
    e, p = cfg.train.epochs, cfg.prune
    if m.masks == "shrink":             # Top-Down: per task a training, pruning rounds with fine-tuning
        rounds = p.td_rounds or [1] * n
        return sum(2 * e + p.finetune_epochs * max(r - 1, 0) for r in rounds)
    if m.masks == "grow":               # Bottom-Up (its TR-BU re-training is a job of its own)
        return n * (2 * e + p.max_rounds * p.finetune_epochs)
    return n * e


def memoryless_baselines() -> tuple[str, ...]:
    return tuple(n for n in BASELINES if not REGISTRY[n].memory and not REGISTRY[n].old_data)
