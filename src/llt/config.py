"""Typed, frozen configuration: the single source of truth for a run.

A `RunConfig` has one frozen dataclass per section. Every field carries its help text (and, for strings
with a closed set of values, its choices) in the dataclass metadata, so `llt show-config --help-fields`
and the docs come from the same place. Presets are YAML files in `configs/` (a preset may `extends:`
another); `--set section.field=value` overrides are parsed as YAML scalars and checked against the
field's type. `validate()` runs once, up front, and raises `LLTError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from llt.errors import LLTError
from llt.subbatches import empty_sub_batch
from llt.registry import REGISTRY, RUN_METHODS, check_config, method_help
from llt.presets import load_preset_tree


def _f(default, help: str, choices: tuple[str, ...] | None = None):
    """A dataclass field with help text (and optional choices) in its metadata."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


DATASETS = ("cifar10", "cifar100", "tinyimagenet", "digits", "array")
BATCHNORM_GROUPS = ("original", "balanced", "labelled", "joint")
BN_RUNNING = ("auto", "original", "once", "labelled")


@dataclass(frozen=True)
class RunSection:
    method: str = _f("bu", f"what to run: {method_help()} (docs/baselines.md)", RUN_METHODS)
    seed: int = _f(0, "run seed: data split, exemplars, augmentation and initialisation derive from it (0 is a valid seed)")
    out_dir: str = _f("runs", "folder that holds run directories")
    name: str = _f("", "readable run name (slug); empty: derived from preset, method, dataset and seed")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    deterministic: bool = _f(False, "ask torch for deterministic kernels (slower on GPU; bit-for-bit reruns)")
    checkpoint_every: int = _f(1, "save the state of the training in progress every N epochs (in the background), so an "
                               "interrupted training continues from there instead of from the start of its stage; "
                               "0: never. Does not change results, so it is not part of the run's identity")


@dataclass(frozen=True)
class DataSection:
    dataset: str = _f("cifar10", "dataset name; 'array' reads data.array_path", DATASETS)
    data_dir: str = _f("data", "folder with the dataset files (archives or extracted folders) and the pool")
    cache_dir: str = _f("", "cache for downloads and decoded arrays; empty: $LLT_CACHE_DIR or ~/.cache/lifelong-tickets")
    download: bool = _f(False, "download missing official archives into the cache folder (also: LLT_DOWNLOAD=1)")
    require_official: bool = _f(False, "refuse data whose checksums differ from the official release instead of warning")
    array_path: str = _f("", "for dataset=array: .npz with train_images/train_labels/test_images/test_labels")
    num_tasks: int = _f(0, "number of tasks; 0: all classes (num_classes / classes_per_task)")
    classes_per_task: int = _f(2, "classes per task (C)")
    class_order: Optional[tuple[int, ...]] = _f(None, "class order as original class ids; empty: the dataset's default "
                                                "(CIFAR-10 [9,8,7,1,5,0,3,4,6,2]; CIFAR-100 iCaRL seed-1993 permutation)")
    val_fraction: float = _f(0.1, "fraction of each class's training images held out for validation (9:1 split)")
    train_per_class: int = _f(0, "train on a seeded subset of this many images per class (the rest of the split's "
                              "training part is left out; validation is unchanged); 0: all. For small studies")
    val_per_class: int = _f(0, "validate on at most this many of each class's validation images (a seeded subset "
                            "of the 9:1 split; the training images are unchanged); 0: all, as the original")
    exemplars_per_class: int = _f(100, "exemplar memory per old class")
    exemplar_selection: str = _f("random", "how exemplars are chosen: random (run seed) or herding (teacher features)",
                                 ("random", "herding"))
    pool: str = _f("tinyimagenet32", "unlabeled pool for lottery teaching: 'tinyimagenet32' (DATA_DIR/tinyimagenet32-pool.npy or built from "
                   "DATA_DIR/tiny-imagenet-200), 'builtin' (label-free images shipped with the dataset), 'none', or a "
                   "path to a .npy/.npz image array (relative paths are inside data_dir)")
    pool_size: int = _f(0, "use only the first N pool images (0: all)")
    pool_resize: bool = _f(False, "resize pool images to the dataset's image size (area filter when shrinking, "
                           "bilinear when enlarging) instead of refusing a pool of another size")


@dataclass(frozen=True)
class ModelSection:
    arch: str = _f("preact_resnet18", "backbone", ("preact_resnet18",))
    width: int = _f(64, "channels of the first stage (64 in the paper; small values make tiny test models)")
    stem_stride: int = _f(0, "stride of the stem conv; 0: 1 for 32x32 inputs, 2 for 64x64 inputs")


@dataclass(frozen=True)
class TrainSection:
    epochs: int = _f(100, "epochs per task (dense and ticket training)")
    batch_size: int = _f(256, "task-1 batch; later tasks use four sub-batches of batch_size // 4")
    eval_batch_size: int = _f(0, "batch size for evaluation and feature extraction; 0: 256 on the CPU, 1024 on CUDA "
                              "(measured, docs/benchmarks.md)")
    lr: float = _f(0.01, "SGD learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay (all parameters)")
    milestones: tuple[int, ...] = _f((60, 80), "epochs at which the learning rate is multiplied by gamma")
    gamma: float = _f(0.1, "learning-rate decay factor at each milestone")
    precision: str = _f("auto", "auto: bf16 autocast + channels-last on CUDA and on CPUs with native bf16 (AMX-BF16, "
                        "AVX512-BF16), float32 elsewhere; fp32: float32 (NCHW on the CPU), for bit-exact comparisons",
                        ("auto", "bf16", "fp32"))
    select: str = _f("best", "which epoch a training keeps: 'best' by validation accuracy (the seen classes' "
                     "validation images; the current task's only for methods without old data), or 'last'",
                     ("best", "last"))
    compile: bool = _f(True, "torch.compile forward, loss and backward on CUDA (ignored on CPU, where compiling costs more than it saves)")
    batchnorm: str = _f("balanced", "how the lottery loop's fused step (tasks >= 2) groups its sub-batches for BatchNorm's "
                        "batch statistics: 'original': each sub-batch alone (random, new, old, unlabeled), as the original's "
                        "five forward passes; 'balanced' (default): the class-balanced batch (new and old images) together, the random "
                        "and unlabeled sub-batches alone; 'labelled': random, new and old together, unlabeled alone; "
                        "'joint': all four together (docs/training.md)", BATCHNORM_GROUPS)
    bn_running: str = _f("auto", "which sub-batches update BatchNorm's running statistics in the fused step: 'original': "
                         "each group as often as the original's passes over it (unlabeled twice, task 1 twice); 'once': "
                         "each group once per step; 'labelled': each group without pool images once, the pool never; "
                         "'auto': original under train.batchnorm=original, once under joint, else labelled", BN_RUNNING)
    bn_recalibrate: bool = _f(False, "re-estimate BatchNorm's running statistics on the clean (unaugmented) training "
                              "images and exemplars of the seen classes before every validation of the lottery loop, so "
                              "that the kept state and every evaluation use them (measured: no gain, docs/training.md)")


@dataclass(frozen=True)
class TeachingSection:
    enabled: bool = _f(True, "lottery teaching (kNN-queried unlabeled data + distillation); false for the ablation")
    neighbours: int = _f(50, "unlabeled images queried per exemplar (greedy, without replacement)")
    temperature: float = _f(2.0, "distillation temperature T (loss scaled by T^2)")


@dataclass(frozen=True)
class PruneSection:
    rate: float = _f(0.2, "fraction of the remaining (prunable) conv weights removed per round")
    finetune_epochs: int = _f(30, "epochs of training after each pruning round")
    finetune_lr: float = _f(1e-4, "constant learning rate after each pruning round")
    td_rounds: Optional[tuple[int, ...]] = _f(None, "Top-Down: pruning rounds after each task (one entry per task)")
    td_densities: Optional[tuple[float, ...]] = _f(None, "Top-Down: target density after each task, in (0, 1] (instead of td_rounds)")
    rewind: str = _f("zero", "Top-Down rewinding of conv weights", ("zero", "best", "rand", "finetune"))
    full_rewind: bool = _f(False, "Top-Down: rewind BatchNorm and heads too, not only conv weights")
    td_teacher: str = _f("ticket", "Top-Down: the teacher of task t+1. 'ticket': the ticket T1~t re-trained on task t; "
                         "'original': the model trained on task t under the previous mask (for task 2 the dense "
                         "task-1 model), as the original's main_TD.py", ("ticket", "original"))
    deacc: float = _f(2.0, "Bottom-Up: largest tolerated accuracy drop (points) while pruning")
    accept_decay: float = _f(1.0, "Bottom-Up: accept the ticket when dense SA minus ticket SA is below this (points)")
    base_sparsity: float = _f(90.0, "Bottom-Up: pruning may not stop for accuracy before this sparsity (percent)")
    max_rounds: int = _f(26, "Bottom-Up: cap on pruning rounds per task")
    decision_split: str = _f("val", "split for Bottom-Up decisions; 'test-compat' reproduces the original's test-set use",
                             ("val", "test-compat"))
    allow_empty_layer: bool = _f(False, "allow pruning to remove every weight of a layer")
    retrain_after: bool = _f(False, "Bottom-Up: re-train the tickets from the original initialisation (TR-BU) right "
                             "after the search, into <run>-retrain-original (otherwise: llt retrain RUN_DIR)")


@dataclass(frozen=True)
class BaselineSection:
    lwf_lambda: float = _f(1.0, "lwf: weight of the distillation term (Li & Hoiem 2016 use lambda_o = 1)")
    lwf_temperature: float = _f(2.0, "lwf: distillation temperature T (the soft cross-entropy is not scaled by "
                                "T^2, as in FACIL; Li & Hoiem 2016 use T = 2)")
    ewc_lambda: float = _f(100.0, "ewc: penalty weight lambda in (lambda / 2) sum_i F_i (theta_i - theta*_i)^2 over "
                           "llt's per-image Fisher (FACIL's 5000 is for its batch form, 5-15x smaller; docs/baselines.md)")
    ewc_alpha: float = _f(0.5, "ewc: Fisher accumulation over tasks from F = 0, F <- alpha F + (1 - alpha) F_task "
                          "(FACIL's rule and default); 0 keeps only the newest task's Fisher")
    icarl_temperature: float = _f(1.0, "icarl: temperature of the old model's sigmoid targets (Rebuffi et al. 2017: 1)")
    icarl_bce: str = _f("sum", "icarl: the binary cross-entropy summed over the seen classes and averaged over the batch "
                        "('sum': gradients of the size of cross-entropy's, so the tickets' learning rate serves) or "
                        "averaged over both ('mean': iCaRL's code and Mammoth, whose learning rates assume it)",
                        ("sum", "mean"))
    ce_scope: str = _f("auto", "cross-entropy of finetune, lwf and ewc over 'local': the current task's classes "
                       "(FACIL, PyCIL), or 'global': every seen class; 'auto': local for lwf and ewc, global for "
                       "finetune", ("auto", "local", "global"))
    replay_batching: str = _f("auto", "replay and icarl: 'concat' shuffles the memory into the task's data (FACIL, "
                              "PyCIL, iCaRL); 'balanced' puts a batch of memory images beside every batch of new "
                              "images (Avalanche's replay, Mammoth's ER); 'auto': balanced for replay, concat for "
                              "icarl; derpp, der and erace only balanced (docs/baselines.md)",
                              ("auto", "concat", "balanced"))
    ewc_heads: bool = _f(False, "ewc: include the heads in the Fisher and the penalty (FACIL: backbone only)")
    ewc_labels: str = _f("predicted", "ewc: the labels of the Fisher's log-likelihood, the model's own prediction over "
                         "the seen classes (FACIL's default, max_pred) or the true labels", ("predicted", "true"))
    steps: str = _f("matched", "a baseline's SGD steps per epoch: 'matched', the lottery loop's (one pass over the task's "
                    "data and the memory in batches of batch_size on task 1 and batch_size // 4 after, the memory "
                    "batches beside them), so every method of a config takes the same steps; 'pass', one pass over "
                    "the task's data (with concat batching, and the memory) in batches of batch_size on every task, "
                    "as Mammoth's seq-cifar10 protocol (joint, the upper bound, always takes 'pass')",
                    ("matched", "pass"))
    der_alpha: float = _f(0.2, "derpp, der: weight of the MSE between a memory batch's logits and the logits stored "
                          "when its images entered the memory (Mammoth's seq-cifar10 buffer 500: 0.2; buffer 200: 0.1)")
    der_beta: float = _f(0.5, "derpp: weight of the cross-entropy of a second memory batch (Mammoth's seq-cifar10: 0.5); "
                         "der is derpp with 0")
    der_logits: str = _f("all", "derpp, der: the stored logits an exemplar's MSE covers, 'seen': the heads that existed "
                         "when it was stored; 'all': every head, the future tasks' too, as one head over all classes "
                         "does in Mammoth (docs/baselines.md)", ("seen", "all"))
    mask_from: str = _f("", "train under the tickets of a finished Top-Down or Bottom-Up run (its masks/task{t}.pt "
                        "for task t); empty: dense")


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    teaching: TeachingSection = field(default_factory=TeachingSection)
    prune: PruneSection = field(default_factory=PruneSection)
    baseline: BaselineSection = field(default_factory=BaselineSection)


SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))


# ------------------------------------------------------------------------------------ typed assignment

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Convert a YAML-parsed value to the field type `tp`, or raise LLTError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or value == "" or value == []:
            return None
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise LLTError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise LLTError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LLTError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LLTError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise LLTError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")  # internal: a field type we forgot to handle


def _section_types(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f_type = hints[f.name]
        out[f.name] = (f, f_type)
    return out


def _assign(cfg: RunConfig, key: str, raw: Any) -> RunConfig:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        all_keys = all_config_keys()
        close = difflib.get_close_matches(key, all_keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LLTError(f"unknown config key {key!r}{hint}; keys look like section.field, sections: {', '.join(SECTIONS)}")
    section_name, name = parts
    section = getattr(cfg, section_name)
    fields = _section_types(type(section))
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" (did you mean {section_name}.{close[0]}?)" if close else ""
        raise LLTError(f"unknown config key {key!r}{hint}; fields of {section_name}: {', '.join(fields)}")
    f, tp = fields[name]
    value = _coerce(raw, tp, key)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise LLTError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **{name: value})})


def all_config_keys() -> list[str]:
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(RunConfig(), s))]


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=v' -> ('a.b', YAML-parsed v)."""
    if "=" not in text:
        raise LLTError(f"--set expects section.field=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def from_tree(tree: dict, origin: str = "config") -> RunConfig:
    """Build a RunConfig from a nested mapping {section: {field: value}}; every key is type-checked."""
    cfg = RunConfig()
    for section, values in tree.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LLTError(f"{origin}: unknown config section {section!r}{hint}; sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise LLTError(f"{origin}: section {section!r} must be a mapping")
        for name, value in values.items():
            cfg = _assign(cfg, f"{section}.{name}", value)
    return cfg


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve defaults <- preset (with `extends`) <- overrides, then validate."""
    cfg = from_tree(load_preset_tree(preset), origin=f"preset {preset}") if preset else RunConfig()
    for text in overrides:
        key, value = parse_override(text)
        cfg = _assign(cfg, key, value)
    validate(cfg)
    return cfg


def to_tree(cfg: RunConfig) -> dict:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_tree(cfg), sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------------------ validation

def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise LLTError(f"{key}: {msg}")


KNOWN_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200, "digits": 10}


def validate(cfg: RunConfig) -> None:
    """Check ranges and cross-field rules that do not need the data; raise LLTError naming the field."""
    d, t, p, m, te = cfg.data, cfg.train, cfg.prune, cfg.model, cfg.teaching
    _need(d.classes_per_task >= 1, "data.classes_per_task", "must be at least 1")
    _need(d.num_tasks >= 0, "data.num_tasks", "must be 0 (all) or positive")
    _need(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _need(d.exemplars_per_class >= 0, "data.exemplars_per_class", "must be non-negative")
    _need(d.train_per_class >= 0, "data.train_per_class", "must be 0 (all) or positive")
    _need(d.val_per_class >= 0, "data.val_per_class", "must be 0 (all) or positive")
    _need(d.pool_size >= 0, "data.pool_size", "must be non-negative")
    _need(d.dataset != "array" or bool(d.array_path), "data.array_path", "is required when data.dataset=array")
    n_cls = KNOWN_NUM_CLASSES.get(d.dataset)
    if n_cls is not None:
        n_tasks = check_task_split(n_cls, d.classes_per_task, d.num_tasks)
        if d.class_order is not None:
            check_class_order(d.class_order, n_cls)
        if REGISTRY[cfg.run.method].fused:
            why = empty_sub_batch(t.batch_size, n_tasks, d.exemplars_per_class > 0)
            if why:
                raise LLTError(why)
        sched = p.td_rounds if p.td_rounds is not None else p.td_densities
        if REGISTRY[cfg.run.method].task_schedule and sched is not None and len(sched) != n_tasks:
            key = "prune.td_rounds" if p.td_rounds is not None else "prune.td_densities"
            raise LLTError(f"{key} has {len(sched)} entries but the stream has {n_tasks} tasks (one entry per task)")
    _need(cfg.run.checkpoint_every >= 0, "run.checkpoint_every", "must be 0 (never) or a number of epochs")
    _need(m.width >= 1, "model.width", "must be at least 1")
    _need(m.stem_stride in (0, 1, 2), "model.stem_stride", "must be 0 (auto), 1 or 2")
    _need(t.epochs >= 1, "train.epochs", "must be at least 1")
    _need(t.batch_size >= 4, "train.batch_size", "must be at least 4 (later tasks use batch_size // 4)")
    _need(not (t.batchnorm == "joint" and t.bn_running == "labelled" and te.enabled), "train.bn_running",
          "labelled updates no group that holds pool images, and train.batchnorm=joint puts every sub-batch, the "
          "pool's too, in one group: the running statistics would never change (choose once or original)")
    _need(t.eval_batch_size >= 0, "train.eval_batch_size", "must be 0 (automatic) or a positive batch size")
    _need(t.lr > 0, "train.lr", "must be positive")
    _need(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    _need(t.weight_decay >= 0, "train.weight_decay", "must be non-negative")
    _need(list(t.milestones) == sorted(t.milestones) and all(x > 0 for x in t.milestones),
          "train.milestones", "must be increasing positive epochs")
    _need(0 < t.gamma <= 1, "train.gamma", "must be in (0, 1]")
    _need(te.neighbours >= 1, "teaching.neighbours", "must be at least 1")
    _need(te.temperature > 0, "teaching.temperature", "must be positive")
    _need(0 < p.rate < 1, "prune.rate", f"must be in (0, 1), got {p.rate}")
    _need(p.finetune_epochs >= 0, "prune.finetune_epochs", "must be non-negative")
    _need(p.finetune_lr > 0, "prune.finetune_lr", "must be positive")
    _need(p.td_rounds is None or p.td_densities is None, "prune.td_rounds",
          "give either td_rounds or td_densities, not both")
    if p.td_rounds is not None:
        _need(all(r >= 0 for r in p.td_rounds), "prune.td_rounds", f"round counts must be non-negative, got {list(p.td_rounds)}")
    if p.td_densities is not None:
        _need(all(0 < x <= 1 for x in p.td_densities), "prune.td_densities", "densities must be in (0, 1]")
        _need(all(a >= b for a, b in zip(p.td_densities, p.td_densities[1:])), "prune.td_densities",
              f"densities must not increase, got {list(p.td_densities)}")
    _need(p.deacc >= 0, "prune.deacc", "must be non-negative")
    _need(p.accept_decay >= 0, "prune.accept_decay", "must be non-negative")
    _need(0 <= p.base_sparsity <= 100, "prune.base_sparsity", f"must be within 0-100 (percent), got {p.base_sparsity}")
    _need(p.max_rounds >= 0, "prune.max_rounds", "must be non-negative")
    b = cfg.baseline
    _need(b.lwf_lambda >= 0, "baseline.lwf_lambda", f"must be non-negative, got {b.lwf_lambda}")
    _need(b.lwf_temperature > 0, "baseline.lwf_temperature", f"must be positive, got {b.lwf_temperature}")
    _need(b.ewc_lambda >= 0, "baseline.ewc_lambda", f"must be non-negative, got {b.ewc_lambda}")
    _need(0 <= b.ewc_alpha < 1, "baseline.ewc_alpha", f"must be in [0, 1), got {b.ewc_alpha}")
    _need(b.icarl_temperature > 0, "baseline.icarl_temperature", f"must be positive, got {b.icarl_temperature}")
    for key, msg in check_config(cfg):
        raise LLTError(f"{key}: {msg}")


def legacy_tree(tree: dict) -> dict:
    """A run's stored config tree as this version reads it: a run written before train.batchnorm existed
    trained with the original's BatchNorm numerics, so a lottery-loop run reads as train.batchnorm=original
    (not today's default; the baselines never used the setting and keep the default). Other trees are
    returned as they are."""
    if not (isinstance(tree, dict) and isinstance(tree.get("train"), dict) and "batchnorm" not in tree["train"]):
        return tree
    method = REGISTRY.get(str((tree.get("run") or {}).get("method", RunSection.method)))
    if method is None or not method.fused:
        return tree
    return {**tree, "train": {**tree["train"], "batchnorm": "original"}}


def batchnorm_setup(t: TrainSection) -> tuple[str, str, bool]:
    """train.batchnorm, bn_running and bn_recalibrate with 'auto' resolved: (groups, running, recalibrate).
    Under batchnorm=original, auto gives the original's numerics (every pass updates the running statistics)."""
    original = t.batchnorm == "original"
    running = t.bn_running if t.bn_running != "auto" else (
        "original" if original else "once" if t.batchnorm == "joint" else "labelled")
    return t.batchnorm, running, t.bn_recalibrate


def check_task_split(num_classes: int, classes_per_task: int, num_tasks: int) -> int:
    """Return the number of tasks; raise LLTError if the classes cannot be cut into tasks of equal size."""
    if num_classes % classes_per_task:
        raise LLTError(f"data.classes_per_task: {num_classes} classes are not divisible into tasks of "
                       f"{classes_per_task} classes")
    most = num_classes // classes_per_task
    if num_tasks > most:
        raise LLTError(f"data.num_tasks: {num_tasks} tasks of {classes_per_task} classes need "
                       f"{num_tasks * classes_per_task} classes, the dataset has {num_classes}")
    return num_tasks or most


def check_class_order(order, num_classes: int) -> None:
    if sorted(int(c) for c in order) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - {int(c) for c in order})
        dup = sorted({int(c) for c in order if list(order).count(c) > 1})
        raise LLTError(f"data.class_order is not a permutation of 0..{num_classes - 1} "
                       f"(length {len(order)}, missing {missing[:10]}, repeated {dup[:10]})")
