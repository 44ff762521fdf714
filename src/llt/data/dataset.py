"""The in-memory dataset every reader produces: uint8 images (N, 3, H, W) and int64 labels."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from llt.errors import LLTError


@dataclass
class ImageDataset:
    """A labelled image dataset with an official train/test split.

    Labels are the dataset's original class ids (0..num_classes-1); the class-incremental stream remaps
    them to positions in the class order. `provenance` says where the data came from and whether its
    checksums matched the official release (`status`: official, modified, unverified, embedded, user).
    """

    name: str
    train_images: torch.Tensor  # (N, 3, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor   # (M, 3, H, W) uint8
    test_labels: torch.Tensor   # (M,) int64
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]  # per-channel normalisation, in [0, 1] units
    std: tuple[float, float, float]
    provenance: dict = field(default_factory=dict)
    unlabeled: torch.Tensor | None = None  # optional label-free images shipped with the dataset (N, 3, H, W) uint8

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def info(self) -> dict:
        """Counts and shapes, as printed by `llt data info`."""
        tr = torch.bincount(self.train_labels, minlength=self.num_classes).tolist()
        te = torch.bincount(self.test_labels, minlength=self.num_classes).tolist()
        return {
            "dataset": self.name,
            "num_train": int(self.train_labels.numel()),
            "num_test": int(self.test_labels.numel()),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "train_per_class": tr,
            "test_per_class": te,
            "class_names": self.class_names,
            "num_unlabeled": 0 if self.unlabeled is None else int(self.unlabeled.shape[0]),
            "checksums_matched": self.provenance.get("checksums_matched"),
            "provenance": self.provenance,
        }


def check_images(images, source: str, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Validate an image array and return it as (N, 3, H, W) uint8 numpy.

    Accepts (N, H, W, 3) or (N, 3, H, W) uint8. Anything else raises LLTError naming `source`.
    """
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise LLTError(f"{source}: images must be uint8, got dtype {a.dtype}")
    if a.ndim != 4 or 3 not in (a.shape[1], a.shape[3]):
        raise LLTError(f"{source}: images must have shape (N, H, W, 3) or (N, 3, H, W), got {tuple(a.shape)}")
    if a.shape[1] != 3:  # channels last -> channels first
        a = a.transpose(0, 3, 1, 2)
    if a.shape[0] == 0:
        raise LLTError(f"{source}: the image array is empty")
    if expect_hw is not None and tuple(a.shape[2:]) != tuple(expect_hw):
        raise LLTError(f"{source}: images are {a.shape[2]}x{a.shape[3]}, expected {expect_hw[0]}x{expect_hw[1]}")
    return np.ascontiguousarray(a)


def check_labels(labels, n: int, source: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n or not np.issubdtype(y.dtype, np.integer):
        raise LLTError(f"{source}: labels must be {n} integers, got shape {tuple(y.shape)} dtype {y.dtype}")
    if n and y.min() < 0:
        raise LLTError(f"{source}: labels must be non-negative")
    return y.astype(np.int64)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W), in [0, 1] units."""
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def warn(msg: str) -> None:
    """A loud warning on stderr (never silent about data that is not what it claims to be)."""
    print(f"[llt] WARNING: {msg}", file=sys.stderr, flush=True)
