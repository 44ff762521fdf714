"""THE training loop (METHOD 3.1 and 3.2): the only place that calls optimizer.step().

Task 1: cross-entropy on both branches for the same batch. Tasks k+1 >= 2: the five-term loss

    L = (CE_aux(x_rand) + KD_aux(x_unl)) + 0.5 * (coef_new * CE_main(x_new) + coef_old * CE_main(x_old) + KD_main(x_unl))

with sub-batches of b = batch_size // 4: 64 random images of new data + exemplars (one epoch is one pass
over them), a balanced batch of int(b/(k+1)) new and int(b*k/(k+1)) old images (both restarted when they
run out), and b frozen-augmented unlabeled images with their teacher logits.

Fusion (METHOD decision 4): the original runs five forward passes per step. Here the sub-batches are
concatenated and go through the backbone once; BatchNorm normalises groups of sub-batches with their own
statistics (`bn_segments`, train.batchnorm): by default the class-balanced batch (new + old) as one batch,
the random and unlabeled sub-batches alone, and only labelled images update the running statistics. With
train.batchnorm=original each sub-batch is its own group and the running statistics are updated once per
original pass (the unlabeled images twice, the task-1 batch twice): loss and gradients then equal the
five-pass step (tests/test_trainer.py). docs/training.md has the modes and the measurements behind the
default.

Class-incremental baselines (llt.methods: finetune, joint, replay, derpp/der, erace, lwf, ewc, icarl) train
through the same loop with a `Recipe` and, by default, the same optimisation budget (joint, the upper bound,
and baseline.steps=pass take one pass over their own data instead): as many SGD steps per epoch as the
lottery loop takes (one pass over the task's data plus the memory, in batches of batch_size on task 1 and batch_size // 4
after), each step drawing that many images of the method's own training set (the task's data; with
`concat` replay the task's data and the memory shuffled together; with `balanced` replay as many memory
images again beside them). The loss is made of the terms the method has: cross-entropy over the seen heads
(or iCaRL's sigmoid binary cross-entropy), distillation of old logits from a frozen teacher (LwF, iCaRL),
and a parameter penalty (EWC); a method that owns its loss (DER++, ER-ACE) gives `Recipe.loss_fn`, called
with a `Step`. Only the balanced (main) branch is trained and evaluated for them. Every
epoch records its steps and the new, memory and unlabeled images they drew.

The trainer knows nothing of tickets: the `mask` argument of `fit_task` (a Mask, checked against the
model) is enforced by zeroing masked gradients before each step and masked weights after it. The learning
rate is a function of the epoch (`learning_rate`), so a resumed training needs no scheduler state.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from llt.checkpointing import EpochCheckpoint, require_state
from llt.data.augment import Normalizer, crop_flip
from llt.errors import LLTError
from llt.evaluation import accuracy
from llt.losses import balanced_coefficients, balanced_sizes, distillation
from llt.pruning.mask import Mask
from llt.teaching import TeachingSet


class NonFiniteLoss(LLTError):
    """The loss became NaN or infinite; names the task and epoch."""


@dataclass
class TaskData:
    """Everything one task's training reads, resident on the training device."""

    images: torch.Tensor            # (N, 3, H, W) uint8: every training image of the dataset
    labels: torch.Tensor            # (N,) int64 remapped labels
    new_idx: torch.Tensor           # the current task's training indices
    memory_idx: torch.Tensor        # exemplar indices of the old classes (empty on task 1)
    val_idx: torch.Tensor           # validation indices of every seen class (model selection)
    teaching: TeachingSet | None = None  # frozen unlabeled images + teacher logits (tasks >= 2)
    teacher: torch.nn.Module | None = None  # baselines: the frozen previous model (LwF, iCaRL)
    val_images: torch.Tensor | None = None  # images/labels val_idx refers to, when not the training images
    val_labels: torch.Tensor | None = None  # (the original's test-set decisions: prune.decision_split=test-compat)
    val_sizes: tuple[int, ...] = ()         # val_idx as consecutive per-task sets (for the per-task row); () one set
    steps_per_epoch: int = 0                # baselines: SGD steps per epoch (the budget); 0: one pass over their data
    first_label: int = 0                    # the current task's first label: images below it count as old-class ones


@dataclass(frozen=True)
class Schedule:
    epochs: int
    lr: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    temperature: float = 2.0
    select: str = "best"            # the epoch a training keeps: "best" by validation accuracy, or "last"
    batchnorm: str = "balanced"     # the fused step's BatchNorm groups (BN_GROUPS; train.batchnorm's default)
    bn_running: str = "labelled"    # which groups update the running statistics (train.bn_running, resolved)
    bn_recalibrate: bool = False    # re-estimate the running statistics on clean images before each validation


@dataclass(frozen=True)
class Recipe:
    """The loss terms of a class-incremental baseline (every task, the first included):

    loss          "ce": softmax cross-entropy over the heads of the seen tasks; "bce": iCaRL's sigmoid
                  binary cross-entropy against one-hot targets, the old classes' targets replaced by the
                  teacher's sigmoid outputs, summed over classes and averaged over the batch ("bce-mean":
                  averaged over the classes too)
    distill       LwF: weight of the soft cross-entropy of the old heads to the teacher's (not T^2-scaled)
    temperature   distillation temperature (LwF) or sigmoid temperature of the teacher's targets (iCaRL)
    penalty       EWC: a callable model -> scalar tensor added to the loss (None: no penalty)
    ce_offset     "ce" over the logits from this index on, labels shifted by it: the current task's classes
                  only ("local" cross-entropy of FACIL and PyCIL) when it is the first class of the task; 0:
                  over every seen class
    batching      with a memory: "concat" draws each batch from the task's data and the memory shuffled
                  together; "balanced" draws a batch of the task's data and, beside it, as many memory images
                  (uniformly over the memory, whose classes hold equal numbers of exemplars)
    loss_fn       a method that owns its loss (DER++, ER-ACE): a callable Step -> scalar replacing the terms
                  above (the loop keeps batching, augmentation, forward, masks and the step)
    terms         what identifies loss_fn's settings (e.g. its weights), part of the epoch checkpoint's identity
    heads         heads of the forward pass for loss_fn (0: the seen ones)
    memory_batches  balanced batching: memory batches drawn beside each batch of the task's data (DER++: 2)
    batch_size    images of the task's data per step (0: the loop's, batch_size on task 1 and batch_size // 4
                  after)
    step_matched  False: one pass over the method's own data per epoch, not the lottery loop's step count
                  (joint, the upper bound)
    """

    loss: str = "ce"
    distill: float = 0.0
    temperature: float = 2.0
    penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None
    ce_offset: int = 0
    batching: str = "concat"
    loss_fn: Callable[["Step"], torch.Tensor] | None = None
    terms: tuple = ()
    heads: int = 0
    memory_batches: int = 1
    batch_size: int = 0
    step_matched: bool = True


@dataclass
class Step:
    """One step of a method that owns its loss (Recipe.loss_fn): what the loss may read. The loop drew the
    batch, augmented it and ran the forward pass; the loss returns one scalar and the loop takes the step.

    k        old tasks (task k+1 is learned)
    logits   (rows, C) the main branch's logits, float, over Recipe.heads heads (0: the k+1 seen heads)
    labels   (rows,) labels of the rows
    idx      (rows,) dataset indices of the rows (a method's per-exemplar stored targets are keyed by them)
    sizes    rows of each part, in order: the main batch, then each memory batch (balanced batching)
    old      the teacher's logits over the k old heads, or None
    classes_per_task  outputs per head
    """

    k: int
    logits: torch.Tensor
    labels: torch.Tensor
    idx: torch.Tensor
    sizes: tuple[int, ...]
    old: torch.Tensor | None
    classes_per_task: int

    def part(self, i: int) -> slice:
        """The rows of part i (0: the main batch; 1, 2, ...: the memory batches)."""
        start = sum(self.sizes[:i])
        return slice(start, start + self.sizes[i])


# The fused step's sub-batches, in batch order: 0 random (aux branch), 1 balanced new, 2 balanced old, 3 unlabeled.
# Each BatchNorm mode lists the groups that are normalised together (one segment of SegmentBatchNorm2d each).
BN_GROUPS = {
    "original": ((0,), (1,), (2,), (3,)),   # each sub-batch alone: the original's five forward passes
    "balanced": ((0,), (1, 2), (3,)),       # the class-balanced batch (new + old) as one batch
    "labelled": ((0, 1, 2), (3,)),          # every labelled image together, the pool's alone
    "joint": ((0, 1, 2, 3),),               # one batch
}
ORIGINAL_PASSES = (1, 1, 1, 2)              # the original's forward passes over each sub-batch (the pool: both branches)


def bn_segments(groups: str, running: str, sizes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The (size, running-statistics updates) segments of a fused batch of sub-batches `sizes` (in batch order).

    running "original": a group is updated as often as the original passes over its sub-batches (each time
    with the group's statistics); "once": each group once; "labelled": each group once unless it holds pool
    images, which never update the running statistics. Empty groups are left out."""
    out = []
    for group in BN_GROUPS[groups]:
        size = sum(sizes[i] for i in group)
        if size == 0:
            continue
        if running == "original":
            updates = sum(ORIGINAL_PASSES[i] for i in group if sizes[i])
        elif running == "once":
            updates = 1
        elif running == "labelled":
            updates = 0 if 3 in group and sizes[3] else 1
        else:
            raise ValueError(f"bn_running must be original, once or labelled, got {running!r}")
        out.append((size, updates))
    return tuple(out)


def learning_rate(s: Schedule, epoch: int) -> float:
    """The learning rate of (1-based) `epoch`: lr * gamma ** (milestones passed), as MultiStepLR gives when
    stepped once per epoch (milestone 60: epochs 1-60 at lr, 61-80 at lr * gamma, ...)."""
    return s.lr * s.gamma ** bisect.bisect_right(sorted(s.milestones), epoch - 1)


@dataclass
class TaskResult:
    best_state: dict                # state_dict at the epoch with the best validation accuracy
    best_epoch: int                 # 1-based
    best_val: float                 # percent
    last_state: dict
    best_row: list = field(default_factory=list)  # validation accuracy per set of data.val_sizes at the best epoch
    history: list = field(default_factory=list)  # per epoch: loss, val, lr, seconds, steps, images

    def budget(self) -> dict:
        """What the training consumed: epochs, SGD steps (and per epoch) and the images its steps drew."""
        h = self.history
        images = {kind: sum(e.get("images", {}).get(kind, 0) for e in h) for kind in ("new", "memory", "unlabeled")}
        steps = sum(e.get("steps", 0) for e in h)
        return {"epochs": len(h), "steps": steps, "steps_per_epoch": h[0].get("steps", 0) if h else 0,
                **{f"{kind}_images": v for kind, v in images.items()}}


class Cycler:
    """Endless shuffled batches over an index set, restarted (and reshuffled) when it runs out.

    Like a shuffled DataLoader with drop_last=False that is re-created on exhaustion: the last batch of
    each pass may be short. With `fill`, every batch is full: one that reaches the end of a pass continues
    into the next, reshuffled one (balanced replay's memory batches).
    """

    def __init__(self, indices: torch.Tensor, batch: int, generator: torch.Generator, fill: bool = False):
        self.indices, self.batch, self.generator, self.fill = indices, batch, generator, fill
        self.order, self.pos = indices[:0], 0

    def _take(self, n: int) -> torch.Tensor:
        if self.pos >= self.order.numel():
            perm = torch.randperm(self.indices.numel(), generator=self.generator, device=self.generator.device)
            self.order, self.pos = self.indices[perm.to(self.indices.device)], 0
        out = self.order[self.pos:self.pos + n]
        self.pos += out.numel()
        return out

    def next(self) -> torch.Tensor:
        out = self._take(self.batch)
        while self.fill and out.numel() < self.batch:
            out = torch.cat([out, self._take(self.batch - out.numel())])
        return out


def memory_streams(r: Recipe) -> tuple[str, ...]:
    """The names of the memory batches' streams of a recipe ("memory", then "memory2", ...)."""
    return tuple("memory" if i == 0 else f"memory{i + 1}" for i in range(r.memory_batches))


def clone_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Trainer:
    def __init__(self, model: torch.nn.Module, normalizer: Normalizer, autocast_dtype: torch.dtype | None = None,
                 eval_batch_size: int = 256, compile: bool = False):
        self.model, self.norm, self.gen = model, normalizer, None
        self.autocast_dtype, self.eval_batch_size = autocast_dtype, eval_batch_size
        self.device = next(model.parameters()).device
        # Forward + loss (and, through AOTAutograd, the backward) compiled; the optimizer step stays eager.
        # Compiled and eager agree to float rounding, BatchNorm running statistics included.
        self._masked_params, self._mask_values = [], []
        self._first_loss = torch.compile(self.first_task_loss) if compile else self.first_task_loss
        self._distill_loss = torch.compile(self.distill_loss) if compile else self.distill_loss

    # ------------------------------------------------------------------------------------------- losses
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def first_task_loss(self, x: torch.Tensor, y: torch.Tensor, updates: int = 2) -> torch.Tensor:
        """CE of both branches on one batch; one backbone pass standing for the original's two (which update
        the running statistics twice; `updates` says how often)."""
        with self._autocast():
            f = self.model.features(x, segments=((x.shape[0], updates),))
            return (F.cross_entropy(self.model.head_logits(f, 1, "main").float(), y)
                    + F.cross_entropy(self.model.head_logits(f, 1, "aux").float(), y))

    def distill_loss(self, k: int, x: torch.Tensor, sizes: tuple[int, int, int, int], y_rand: torch.Tensor,
                     y_new: torch.Tensor, y_old: torch.Tensor, t_main: torch.Tensor | None, t_aux: torch.Tensor | None,
                     coefs: tuple[float, float], temperature: float,
                     segments: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        """The five-term loss of task k+1 (k old tasks) on a concatenated batch [rand, new, old, unlabeled].
        `segments` (bn_segments) groups the sub-batches for BatchNorm; None: the original's, one per sub-batch."""
        if segments is None:
            segments = bn_segments("original", "original", sizes)
        m = self.model
        with self._autocast():
            f = m.features(x, segments=segments)
            f_r, f_n, f_o, f_u = f.split(sizes)
            loss_rand = F.cross_entropy(m.head_logits(f_r, k + 1, "aux").float(), y_rand)
            loss_bal = coefs[0] * F.cross_entropy(m.head_logits(f_n, k + 1, "main").float(), y_new)
            if sizes[2]:
                loss_bal = loss_bal + coefs[1] * F.cross_entropy(m.head_logits(f_o, k + 1, "main").float(), y_old)
            loss = loss_rand + 0.5 * loss_bal
            if sizes[3]:
                loss = loss + distillation(m.head_logits(f_u, k, "aux"), t_aux, temperature) \
                    + 0.5 * distillation(m.head_logits(f_u, k, "main"), t_main, temperature)
        return loss

    def recipe_loss(self, k: int, x: torch.Tensor, y: torch.Tensor, old: torch.Tensor | None, r: Recipe) -> torch.Tensor:
        """A baseline's loss on one batch of task k+1 (k old tasks): its terms and only those. `old` holds the
        teacher's logits over the k old heads (None without a teacher or on task 1)."""
        with self._autocast():
            z = self.model(x, k + 1, "main").float()
        if r.loss in ("bce", "bce-mean"):
            target = F.one_hot(y, z.shape[1]).float()
            if old is not None:
                target[:, :old.shape[1]] = torch.sigmoid(old.float() / r.temperature)
            # summed over the seen classes, averaged over the batch: gradients of the size of CE's, so the
            # tickets' learning rate serves (a mean over classes too, as iCaRL's Theano code, needs lr 2.0)
            loss = F.binary_cross_entropy_with_logits(z, target, reduction="sum") / z.shape[0]
            if r.loss == "bce-mean":        # baseline.icarl_bce=mean: over the classes too (iCaRL's code, Mammoth)
                loss = loss / z.shape[1]
        else:
            loss = F.cross_entropy(z[:, r.ce_offset:], y - r.ce_offset) if r.ce_offset else F.cross_entropy(z, y)
            if old is not None and r.distill:
                # Li & Hoiem's term is the unscaled soft cross-entropy: undo llt's T^2 factor
                loss = loss + r.distill * distillation(z[:, :old.shape[1]], old.float(), r.temperature) / r.temperature ** 2
        if r.penalty is not None:
            loss = loss + r.penalty(self.model)
        return loss

    # ------------------------------------------------------------------------------------------- steps
    def _bind_mask(self, mask: Mask | None) -> None:
        """Resolve the mask to (parameter, keep) pairs once per task (not on every step)."""
        if mask is not None:
            mask.check_fits(self.model, "the training's mask")
        params = dict(self.model.named_parameters())
        pairs = [(params[name], keep.to(params[name].device, params[name].dtype))
                 for name, keep in ({} if mask is None else mask.masks).items()]
        self._masked_params = [p for p, _ in pairs]
        self._mask_values = [k for _, k in pairs]

    def _apply_mask_to_grads(self) -> None:
        pairs = [(p.grad, m) for p, m in zip(self._masked_params, self._mask_values) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def _apply_mask_to_weights(self) -> None:
        if self._masked_params:
            torch._foreach_mul_(self._masked_params, self._mask_values)

    def _step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self._apply_mask_to_grads()
        opt.step()
        self._apply_mask_to_weights()

    def _epoch_first(self, opt, data: TaskData, s: Schedule) -> tuple[torch.Tensor, int, dict]:
        total, steps = torch.zeros((), device=self.device), 0
        perm = torch.randperm(data.new_idx.numel(), generator=self.gen, device=self.gen.device).to(self.device)
        for i in range(0, perm.numel(), s.batch_size):
            idx = data.new_idx[perm[i:i + s.batch_size]]
            x = self.norm(crop_flip(data.images[idx], self.gen))
            loss = self._first_loss(x, data.labels[idx], 2 if s.bn_running == "original" else 1)
            self._step(opt, loss)
            total += loss.detach()
            steps += 1
        return total, steps, {"new": data.new_idx.numel()}

    @staticmethod
    def recipe_batch(k: int, s: Schedule, r: Recipe | None = None) -> int:
        """A baseline's batch of its own training images: batch_size on task 1, batch_size // 4 after (the
        lottery loop's sub-batch), unless the recipe sets its own."""
        if r is not None and r.batch_size:
            return r.batch_size
        return s.batch_size if k == 0 else s.batch_size // 4

    @staticmethod
    def recipe_union(data: TaskData, r: Recipe) -> torch.Tensor:
        """The indices a baseline's main batch is drawn from: the task's data, with the memory under concat."""
        return torch.cat([data.new_idx, data.memory_idx]) if r.batching == "concat" else data.new_idx

    def _epoch_recipe(self, k: int, opt, data: TaskData, s: Schedule, r: Recipe, cyclers: dict,
                      steps: int) -> tuple[torch.Tensor, int, dict]:
        """`steps` SGD steps of a baseline (the budget: data.steps_per_epoch, else one pass over its data)."""
        union = self.recipe_union(data, r)
        total = torch.zeros((), device=self.device)
        drawn, new, memory = 0, torch.zeros((), dtype=torch.int64, device=self.device), 0
        for _ in range(steps):
            idx = union[cyclers["train"].next()]
            drawn += idx.numel()
            new += (data.labels[idx] >= data.first_label).sum()     # joint's old tasks count as old-class images
            sizes = [idx.numel()]
            for name in memory_streams(r):      # balanced replay: as many memory images beside them
                if name in cyclers:
                    m = data.memory_idx[cyclers[name].next()]
                    idx, memory = torch.cat([idx, m]), memory + m.numel()
                    sizes.append(m.numel())
            x = self.norm(crop_flip(data.images[idx], self.gen))
            old = None
            if data.teacher is not None and k > 0:
                with torch.no_grad(), self._autocast():
                    old = data.teacher(x, k, "main").float()
            if r.loss_fn is not None:
                with self._autocast():
                    z = self.model(x, r.heads or k + 1, "main").float()
                loss = r.loss_fn(Step(k, z, data.labels[idx], idx, tuple(sizes), old, self.model.classes_per_task))
            else:
                loss = self.recipe_loss(k, x, data.labels[idx], old, r)
            self._step(opt, loss)
            total += loss.detach()
        new = int(new)
        return total, steps, {"new": new, "memory": drawn - new + memory}

    def _epoch_distill(self, k: int, opt, data: TaskData, s: Schedule, cyclers: dict) -> tuple[torch.Tensor, int, dict]:
        b = s.batch_size // 4
        coefs = balanced_coefficients(b, k)
        union = torch.cat([data.new_idx, data.memory_idx])
        perm = torch.randperm(union.numel(), generator=self.gen, device=self.gen.device).to(self.device)
        teach = data.teaching
        total, steps = torch.zeros((), device=self.device), 0
        # the random sub-batches cover the task's data and the memory once; the balanced and unlabeled ones add
        images = {"new": data.new_idx.numel(), "memory": data.memory_idx.numel(), "unlabeled": 0}
        for i in range(0, perm.numel(), b):
            r_idx = union[perm[i:i + b]]
            n_idx = cyclers["new"].next()
            o_idx = cyclers["old"].next() if "old" in cyclers else n_idx[:0]
            # one gather and one crop/flip for the three labelled sub-batches (the randomness is per image)
            parts = [crop_flip(data.images[torch.cat([r_idx, n_idx, o_idx])], self.gen)]
            t_main = t_aux = None
            if teach is not None:
                u_idx = cyclers["unl"].next()
                parts.append(teach.images[u_idx])          # frozen augmentation: used as stored
                t_main, t_aux = teach.logits_main[u_idx], teach.logits_aux[u_idx]
            sizes = (r_idx.numel(), n_idx.numel(), o_idx.numel(), parts[1].shape[0] if teach is not None else 0)
            images["new"] += sizes[1]
            images["memory"] += sizes[2]
            images["unlabeled"] += sizes[3]
            x = self.norm(torch.cat(parts))
            loss = self._distill_loss(k, x, sizes, data.labels[r_idx], data.labels[n_idx], data.labels[o_idx],
                                     t_main, t_aux, coefs, s.temperature,
                                     bn_segments(s.batchnorm, s.bn_running, sizes))
            self._step(opt, loss)
            total += loss.detach()
            steps += 1
        return total, steps, images

    @torch.no_grad()
    def recalibrate(self, data: TaskData, k: int) -> None:
        """Re-estimate every BatchNorm's running statistics on the clean (unaugmented) training images of task
        k+1 and the exemplars of the old classes: the mean of per-batch statistics over batches of
        eval_batch_size in a fixed shuffled order (a generator of its own, so the training's random stream is
        untouched), as if the running average had seen only them. The model is left in train mode."""
        idx = torch.cat([data.new_idx, data.memory_idx])
        order = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(1_000_003 + k))
        idx = idx[order.to(idx.device)]
        bns = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        tracked = [m.num_batches_tracked.clone() for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None           # a cumulative average over the batches below
        self.model.train()
        # batches whose sizes differ by at most one image (tensor_split), so that the images weigh about the same
        n_batches = max(1, idx.numel() // self.eval_batch_size)
        try:
            for part in idx.tensor_split(n_batches):
                with self._autocast():
                    self.model.features(self.norm(data.images[part]))
        finally:
            for m, mom, nbt in zip(bns, momenta, tracked):
                m.momentum = mom
                m.num_batches_tracked.copy_(nbt)

    def validate(self, data: TaskData, num_heads: int) -> dict:
        """Accuracy on data.val_idx over heads 1..num_heads, what selects the best epoch: {"overall": percent,
        "row": percent per set of data.val_sizes}. One evaluation per epoch serves every consumer."""
        images = data.images if data.val_images is None else data.val_images
        labels = data.labels if data.val_labels is None else data.val_labels
        sets = list(data.val_idx.split(list(data.val_sizes))) if data.val_sizes else [data.val_idx]
        return accuracy(self.model, images, labels, sets, self.norm, self.eval_batch_size,
                        self.autocast_dtype, num_heads=num_heads)

    # ------------------------------------------------------------------------------------------- fit
    def fit_task(self, k: int, data: TaskData, s: Schedule, generator: torch.Generator, mask: Mask | None = None,
                 on_epoch: Callable[[int, dict], None] | None = None, checkpoint: EpochCheckpoint | None = None,
                 resume: dict | None = None, recipe: Recipe | None = None) -> TaskResult:
        """Train task k (0-based) for s.epochs; keep the state with the best validation accuracy (the first
        such epoch), or with s.select="last" the last epoch's.

        `recipe` (None: the original's losses, METHOD 3.1/3.2) selects a baseline's loss terms and batch mix.
        `mask` (None: dense) must cover exactly the model's conv weights (LLTError otherwise); its pruned
        weights are zero when training starts and stay exactly zero.

        `generator` drives every random choice (batch order, augmentation); giving each task its own
        seeded generator makes a run resumed at a task boundary identical to an uninterrupted one.
        `checkpoint` receives the whole training state after every due epoch; `resume` (a state it wrote)
        continues the training after that epoch, bit for bit as if it had not stopped.
        Raises NonFiniteLoss (naming task and epoch) as soon as an epoch's loss is NaN or infinite.
        """
        self.gen = generator
        model = self.model
        model.train()
        self._bind_mask(mask)
        self._apply_mask_to_weights()
        opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        cyclers = {}
        if k > 0 and recipe is None:
            n_new, n_old = balanced_sizes(s.batch_size // 4, k)
            if n_new == 0 or (data.memory_idx.numel() and n_old == 0):
                raise LLTError(f"task {k + 1}: the balanced batch of {s.batch_size // 4} images would hold {n_new} new "
                               f"and {n_old} old images; train.batch_size must be at least {4 * max(k + 1, 2)}")
            cyclers["new"] = Cycler(data.new_idx, n_new, self.gen)
            if data.memory_idx.numel() and n_old:
                cyclers["old"] = Cycler(data.memory_idx, n_old, self.gen)
            if data.teaching is not None and data.teaching.images.shape[0]:
                cyclers["unl"] = Cycler(torch.arange(data.teaching.images.shape[0], device=self.device),
                                        s.batch_size // 4, self.gen)
            else:
                data = dataclasses.replace(data, teaching=None)
        recipe_steps = 0
        if recipe is not None:
            batch = self.recipe_batch(k, s, recipe)
            union = self.recipe_union(data, recipe)
            cyclers["train"] = Cycler(torch.arange(union.numel(), device=self.device), batch, self.gen)
            if recipe.batching == "balanced" and data.memory_idx.numel():
                for name in memory_streams(recipe):
                    cyclers[name] = Cycler(torch.arange(data.memory_idx.numel(), device=self.device), batch,
                                           self.gen, fill=True)
            recipe_steps = data.steps_per_epoch or -(-union.numel() // batch)
        best_val, best_epoch, best_state, best_row, history = -1.0, 0, None, [], []
        first = 1
        if resume is not None:
            first, best_val, best_epoch, best_state, history = self._restore(resume, opt, cyclers)
            best_row = list(history[best_epoch - 1].get("val_row", [])) if best_epoch else []
        for epoch in range(first, s.epochs + 1):
            t0 = time.perf_counter()
            lr = learning_rate(s, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            if recipe is not None:
                total, steps, images = self._epoch_recipe(k, opt, data, s, recipe, cyclers, recipe_steps)
            elif k == 0:
                total, steps, images = self._epoch_first(opt, data, s)
            else:
                total, steps, images = self._epoch_distill(k, opt, data, s, cyclers)
            loss = float(total) / max(steps, 1)      # one host sync per epoch
            t_train = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"the loss became {loss} in task {k + 1}, epoch {epoch}; stopping "
                                    f"(the checkpoints of finished tasks are kept)")
            if s.bn_recalibrate and recipe is None:
                self.recalibrate(data, k)
            ev = self.validate(data, k + 1)
            val = ev["overall"]
            if val > best_val or s.select == "last":
                best_val, best_epoch, best_state, best_row = val, epoch, clone_state(model), ev["row"]
            seconds = time.perf_counter() - t0
            stats = {"epoch": epoch, "loss": loss, "val": val, "lr": lr, "seconds": seconds, "steps": steps,
                     "train_seconds": t_train, "val_seconds": seconds - t_train,
                     "best_val": best_val, "best_epoch": best_epoch, "val_row": ev["row"],
                     "images": {"new": 0, "memory": 0, "unlabeled": 0, **images}}
            history.append(stats)
            if checkpoint is not None and checkpoint.due(epoch, s.epochs):
                t1 = time.perf_counter()
                checkpoint.save(epoch, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "generator": self.gen.get_state(), "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else torch.empty(0),
                    "cyclers": {name: {"order": c.order, "pos": c.pos} for name, c in cyclers.items()},
                    "progress": {"epoch": epoch, "best_val": best_val, "best_epoch": best_epoch,
                                 "history": [dict(h) for h in history]},
                }, frozen={"best_state": best_state})   # best_state is never changed in place: no copy
                stats["checkpoint_seconds"] = time.perf_counter() - t1
            if on_epoch:
                on_epoch(epoch, stats)
        return TaskResult(best_state=best_state, best_epoch=best_epoch, best_val=best_val,
                          last_state=clone_state(model), history=history, best_row=best_row)

    def _restore(self, st: dict, opt, cyclers: dict) -> tuple:
        """Load a training state written by fit_task; returns (first epoch to run, best_val, best_epoch,
        best_state, history)."""
        require_state(st, ("model", "optimizer", "generator", "rng_cpu", "cyclers", "progress",
                           "best_state"), "epoch checkpoint")
        if set(st["cyclers"]) != set(cyclers):
            raise LLTError(f"epoch checkpoint: sub-batch streams {sorted(st['cyclers'])} do not match this "
                           f"training's {sorted(cyclers)}")
        self.model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        self.gen.set_state(st["generator"])
        torch.set_rng_state(st["rng_cpu"])
        if self.device.type == "cuda" and st["rng_cuda"].numel():
            torch.cuda.set_rng_state(st["rng_cuda"])
        for name, c in cyclers.items():
            c.order, c.pos = st["cyclers"][name]["order"].to(self.device), int(st["cyclers"][name]["pos"])
        p = st["progress"]
        best_state = {k: v.to(self.device) for k, v in st["best_state"].items()} or None
        return int(p["epoch"]) + 1, float(p["best_val"]), int(p["best_epoch"]), best_state, list(p["history"])
