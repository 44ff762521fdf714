"""The class-incremental stream: class order, tasks, train/validation split, exemplar memory.

Everything here is a pure function of its inputs (labels, seed, sizes); nothing touches images or
mutates a dataset. Tasks are index sets into the dataset's train and test arrays; labels are remapped
to positions in the class order (class `order[j]` gets label j, so task t owns labels t*C .. (t+1)*C-1).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from llt.config import check_class_order, check_task_split
from llt.data.files import sha256_bytes

CIFAR10_ORDER = (9, 8, 7, 1, 5, 0, 3, 4, 6, 2)  # the authors' npy_files/cifar10_class_order.txt
CIFAR100_ORDER_SEED = 1993  # the iCaRL order: numpy permutation of 100 classes with seed 1993


def default_class_order(dataset: str, num_classes: int) -> tuple[int, ...]:
    if dataset == "cifar10":
        return CIFAR10_ORDER
    if dataset == "cifar100":
        return tuple(int(c) for c in np.random.RandomState(CIFAR100_ORDER_SEED).permutation(100))
    return tuple(range(num_classes))


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one purpose (split, exemplars, augmentation, init) of a run seed."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF,
                                    zlib.crc32(purpose.encode())]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def remap_labels(labels: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Original class ids -> positions in `order` (int64)."""
    table = torch.empty(len(order), dtype=torch.int64)
    table[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    return table[labels]


def split_train_val(labels: torch.Tensor, val_fraction: float, seed: int,
                    train_per_class: int = 0, val_per_class: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split of training indices: round(n_c * val_fraction) of each class go to validation;
    with `train_per_class` > 0 only that many of the rest (a seeded subset) are kept for training, with
    `val_per_class` > 0 only that many of the validation part. Capping either leaves the other unchanged.

    Returns sorted index tensors (train, val) into `labels`.
    """
    rng = np.random.default_rng(derive_seed(seed, "split"))
    y = labels.numpy()
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:min(n_val, val_per_class)] if val_per_class > 0 else idx[:n_val])
        train.append(idx[n_val:n_val + train_per_class] if train_per_class > 0 else idx[n_val:])
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(val)))


def random_exemplars(candidates: torch.Tensor, per_class: int, seed: int, label: int) -> torch.Tensor:
    """`per_class` indices drawn without replacement from `candidates` (all of them if fewer)."""
    rng = np.random.default_rng(derive_seed(seed, f"exemplars/{label}"))
    pick = rng.permutation(len(candidates))[:per_class]
    return candidates[torch.from_numpy(np.sort(pick))]


def herding_exemplars(features: torch.Tensor, per_class: int) -> torch.Tensor:
    """iCaRL herding: positions (in selection order) whose running mean best tracks the class mean.

    `features` (n, d) are the teacher's features of one class; they are L2-normalised first. At step k the
    chosen sample minimises || mu - (sum of chosen + f) / k ||. Returns at most `per_class` distinct positions.
    """
    f = torch.nn.functional.normalize(features.double(), dim=1)
    mu = f.mean(0)
    chosen, total = [], torch.zeros_like(mu)
    available = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(per_class, len(f)) + 1):
        dist = ((mu - (total + f) / k) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(torch.argmin(dist))
        chosen.append(i)
        available[i] = False
        total += f[i]
    return torch.tensor(chosen, dtype=torch.int64)


@dataclass(frozen=True)
class Task:
    index: int                      # 0-based; printed as index + 1
    classes: tuple[int, ...]        # original class ids
    labels: tuple[int, ...]         # remapped labels
    train_idx: torch.Tensor         # indices into the dataset's training images
    val_idx: torch.Tensor
    test_idx: torch.Tensor          # indices into the dataset's test images


@dataclass(frozen=True)
class Stream:
    dataset: str
    class_order: tuple[int, ...]
    classes_per_task: int
    tasks: tuple[Task, ...]
    train_labels: torch.Tensor      # remapped labels of every training image
    test_labels: torch.Tensor       # remapped labels of every test image
    exemplars: dict                 # remapped label -> indices into the training images
    seed: int
    val_fraction: float
    exemplars_per_class: int
    exemplar_selection: str

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def memory(self, t: int) -> torch.Tensor:
        """Exemplar indices available while learning task t: those of every class of tasks 0..t-1."""
        parts = [self.exemplars[lab] for task in self.tasks[:t] for lab in task.labels if lab in self.exemplars]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def memory_size(self, t: int) -> int:
        """How many exemplars the memory holds while learning task t (with herding too, before they are chosen)."""
        if self.exemplar_selection == "random":
            return int(self.memory(t).numel())
        return sum(min(self.exemplars_per_class, int((self.train_labels[task.train_idx] == lab).sum()))
                   for task in self.tasks[:t] for lab in task.labels)

    def val_seen(self, t: int) -> torch.Tensor:
        """Validation indices of every class seen after task t (model selection uses these)."""
        return torch.cat([task.val_idx for task in self.tasks[: t + 1]])

    def describe(self, class_names: list[str] | None = None) -> list[dict]:
        rows = []
        for task in self.tasks:
            rows.append({
                "task": task.index + 1,
                "classes": list(task.classes),
                "names": [class_names[c] for c in task.classes] if class_names else [],
                "labels": list(task.labels),
                "num_train": int(task.train_idx.numel()),
                "num_val": int(task.val_idx.numel()),
                "num_test": int(task.test_idx.numel()),
                "num_memory": int(self.memory(task.index).numel()),
            })
        return rows

    def manifest(self) -> dict:
        """Everything that determines the stream, with content hashes of its index sets."""
        ex = sorted(self.exemplars)
        return {
            "dataset": self.dataset,
            "class_order": list(self.class_order),
            "classes_per_task": self.classes_per_task,
            "num_tasks": self.num_tasks,
            "seed": self.seed,
            "split_seed": derive_seed(self.seed, "split"),
            "val_fraction": self.val_fraction,
            "exemplars_per_class": self.exemplars_per_class,
            "exemplar_selection": self.exemplar_selection,
            "sha256_train_idx": sha256_bytes(*[t.train_idx for t in self.tasks]),
            "sha256_val_idx": sha256_bytes(*[t.val_idx for t in self.tasks]),
            "sha256_test_idx": sha256_bytes(*[t.test_idx for t in self.tasks]),
            "sha256_exemplars": sha256_bytes(*[self.exemplars[k] for k in ex]) if ex else None,
        }

    def state_dict(self) -> dict:
        """Index tensors only (loadable with torch.load(weights_only=True))."""
        out = {"class_order": torch.tensor(self.class_order)}
        for task in self.tasks:
            out[f"task{task.index + 1}.train_idx"] = task.train_idx
            out[f"task{task.index + 1}.val_idx"] = task.val_idx
            out[f"task{task.index + 1}.test_idx"] = task.test_idx
        for lab, idx in self.exemplars.items():
            out[f"exemplars.{lab}"] = idx
        return out


def build_stream(dataset: str, train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *,
                 classes_per_task: int, num_tasks: int = 0, class_order: tuple[int, ...] | None = None,
                 val_fraction: float = 0.1, exemplars_per_class: int = 100, exemplar_selection: str = "random",
                 seed: int = 0, train_per_class: int = 0, val_per_class: int = 0) -> Stream:
    """Cut a labelled dataset into a seeded class-incremental stream.

    `train_labels`/`test_labels` are original class ids. With `exemplar_selection="random"` the memory of
    every class is drawn now (from its training split, with the run seed); with "herding" it is left
    empty, to be filled by `herding_exemplars` on teacher features once each task is learned.
    """
    n_tasks = check_task_split(num_classes, classes_per_task, num_tasks)
    order = tuple(int(c) for c in (class_order if class_order is not None else default_class_order(dataset, num_classes)))
    check_class_order(order, num_classes)
    ytr, yte = remap_labels(train_labels, order), remap_labels(test_labels, order)
    train_all, val_all = split_train_val(ytr, val_fraction, seed, train_per_class, val_per_class)
    tasks, exemplars = [], {}
    for t in range(n_tasks):
        labels = tuple(range(t * classes_per_task, (t + 1) * classes_per_task))
        lo, hi = labels[0], labels[-1]
        in_task = lambda idx, y: idx[(y[idx] >= lo) & (y[idx] <= hi)]  # noqa: E731
        tr = in_task(train_all, ytr)
        tasks.append(Task(index=t, classes=order[lo:hi + 1], labels=labels, train_idx=tr,
                          val_idx=in_task(val_all, ytr), test_idx=torch.nonzero((yte >= lo) & (yte <= hi)).flatten()))
        if exemplar_selection == "random" and exemplars_per_class:
            for lab in labels:
                exemplars[lab] = random_exemplars(tr[ytr[tr] == lab], exemplars_per_class, seed, lab)
    return Stream(dataset=dataset, class_order=order, classes_per_task=classes_per_task, tasks=tuple(tasks),
                  train_labels=ytr, test_labels=yte, exemplars=exemplars, seed=seed, val_fraction=val_fraction,
                  exemplars_per_class=exemplars_per_class, exemplar_selection=exemplar_selection)
