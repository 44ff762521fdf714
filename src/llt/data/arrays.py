"""User image arrays (.npy / .npz) and the embedded default dataset (scikit-learn's handwritten digits)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llt.data.dataset import ImageDataset, channel_stats, check_images, check_labels
from llt.data.files import sha256_bytes
from llt.errors import LLTError

IMAGE_KEYS = ("images", "x", "data")
LABEL_KEYS = ("labels", "y", "targets")


def _open(path: Path):
    if not path.is_file():
        raise LLTError(f"missing file {path}")
    if path.suffix not in (".npy", ".npz"):
        raise LLTError(f"{path}: image arrays must be .npy or .npz files")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix == ".npy" else None)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # allow_pickle=False makes numpy refuse object arrays (which would unpickle arbitrary code)
        raise LLTError(f"{path}: not a readable numpy array file ({e})") from None


def load_image_array(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images (and labels if present) from .npy or .npz; images become (N, 3, H, W) uint8.

    An .npz holds the images under one of `images`, `x`, `data` and optional labels under `labels`,
    `y`, `targets`. Layout (N, H, W, 3) or (N, 3, H, W) is detected from the channel axis.
    """
    path = Path(path).expanduser()
    obj = _open(path)
    if isinstance(obj, np.ndarray):
        return check_images(obj, str(path)), None
    with obj as z:
        key = next((k for k in IMAGE_KEYS if k in z.files), None)
        if key is None:
            raise LLTError(f"{path}: no image array found (expected one of {', '.join(IMAGE_KEYS)}; has {', '.join(z.files)})")
        images = check_images(z[key], f"{path}[{key}]")
        lkey = next((k for k in LABEL_KEYS if k in z.files), None)
        labels = check_labels(z[lkey], images.shape[0], f"{path}[{lkey}]") if lkey else None
    return images, labels


def load_array_dataset(path: str | Path, name: str = "array") -> ImageDataset:
    """A labelled dataset from one .npz with train_images, train_labels, test_images, test_labels."""
    path = Path(path).expanduser()
    obj = _open(path)
    if isinstance(obj, np.ndarray):
        raise LLTError(f"{path}: a labelled dataset needs an .npz with train_images, train_labels, test_images, test_labels")
    with obj as z:
        missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in z.files]
        if missing:
            raise LLTError(f"{path}: missing arrays {', '.join(missing)}")
        xtr = check_images(z["train_images"], f"{path}[train_images]")
        xte = check_images(z["test_images"], f"{path}[test_images]", expect_hw=xtr.shape[2:])
        ytr = check_labels(z["train_labels"], xtr.shape[0], f"{path}[train_labels]")
        yte = check_labels(z["test_labels"], xte.shape[0], f"{path}[test_labels]")
        names = [str(s) for s in z["class_names"]] if "class_names" in z.files else None
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if set(np.unique(ytr).tolist()) != set(range(num_classes)):
        raise LLTError(f"{path}: training labels must cover every class 0..{num_classes - 1}")
    xtr_t = torch.from_numpy(xtr)
    mean, std = channel_stats(xtr_t)
    return ImageDataset(
        name=name, train_images=xtr_t, train_labels=torch.from_numpy(ytr), test_images=torch.from_numpy(xte),
        test_labels=torch.from_numpy(yte), num_classes=num_classes,
        class_names=names or [str(i) for i in range(num_classes)], mean=mean, std=std,
        provenance={"source": str(path), "kind": "user array", "status": "user", "checksums_matched": None,
                    "content_sha256": sha256_bytes(xtr, ytr, xte, yte)})


# ------------------------------------------------------------------------------------ embedded digits

def _digits_csv() -> Path:
    spec = importlib.util.find_spec("sklearn")  # locate the file without importing scikit-learn (slow)
    if spec is None or not spec.submodule_search_locations:
        raise LLTError("the embedded dataset 'digits' needs scikit-learn installed (it ships the images)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise LLTError(f"missing file {path}: this scikit-learn installation does not ship the digits data")
    return path


def load_digits(size: int = 32) -> ImageDataset:
    """The 1,797 handwritten digits of UCI/scikit-learn (8x8, 17 grey levels) as RGB uint8 images.

    Images are upscaled to `size` x `size` (bilinear) so the CIFAR pipeline applies unchanged. There is no
    official split, so a fixed one is used, independent of the run seed: within each class, in file order,
    every 5th image (positions 0, 5, 10, ...) is a test image, every 5th from position 1 goes to the
    label-free `unlabeled` set (the demo's pool), and the rest (60 %) is the training set.
    """
    path = _digits_csv()
    with gzip.open(path, "rt") as f:
        rows = np.array([[float(v) for v in r] for r in csv.reader(io.StringIO(f.read())) if r], dtype=np.float64)
    pixels, labels = rows[:, :64], rows[:, 64].astype(np.int64)
    img = torch.from_numpy(np.round(pixels * (255.0 / 16.0)).reshape(-1, 1, 8, 8)).float()
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    img = img.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    test, pool = rank % 5 == 0, rank % 5 == 1
    train = ~(test | pool)
    y = torch.from_numpy(labels)
    xtr = img[torch.from_numpy(train)]
    mean, std = channel_stats(xtr)
    return ImageDataset(
        name="digits", train_images=xtr, train_labels=y[torch.from_numpy(train)],
        test_images=img[torch.from_numpy(test)], test_labels=y[torch.from_numpy(test)], num_classes=10,
        class_names=[str(i) for i in range(10)], mean=mean, std=std,
        provenance={"source": str(path), "kind": "embedded (scikit-learn)", "status": "embedded",
                    "checksums_matched": None, "content_sha256": sha256_bytes(img, y),
                    "note": "UCI optical recognition of handwritten digits, upscaled 8x8 -> 32x32"},
        unlabeled=img[torch.from_numpy(pool)])
