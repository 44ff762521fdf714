"""Entry points: the labelled dataset and the unlabeled pool named by the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llt.config import DataSection
from llt.data.arrays import load_array_dataset, load_digits, load_image_array
from llt.data.cifar import load_cifar
from llt.data.dataset import ImageDataset
from llt.data.files import sha256_bytes
from llt.data.tinyimagenet import build_pool32, load_tinyimagenet
from llt.errors import LLTError

POOL_ARRAY_NAME = "tinyimagenet32-pool.npy"  # what ../shared/data/unpack.py writes


def load_dataset(d: DataSection) -> ImageDataset:
    """Load the labelled dataset of `d.dataset` once, as uint8 tensors."""
    if d.dataset in ("cifar10", "cifar100"):
        return load_cifar(d.dataset, d.data_dir, d.cache_dir, d.download, d.require_official)
    if d.dataset == "tinyimagenet":
        return load_tinyimagenet(d.data_dir, d.cache_dir)
    if d.dataset == "digits":
        return load_digits()
    if d.dataset == "array":
        return load_array_dataset(d.array_path)
    raise LLTError(f"data.dataset: unknown dataset {d.dataset!r}")


def load_pool(d: DataSection, dataset: ImageDataset) -> tuple[torch.Tensor | None, dict]:
    """The unlabeled pool (N, 3, H, W) uint8 and its provenance, or (None, ...) for pool 'none'.

    'tinyimagenet32' reads DATA_DIR/tinyimagenet32-pool.npy when present, else builds the 32x32 pool from
    DATA_DIR/tiny-imagenet-200; 'builtin' uses the label-free images shipped with the dataset (digits);
    anything else is a path to an image array (relative paths are taken inside DATA_DIR).
    """
    name = d.pool
    if name == "none":
        return None, {"pool": "none"}
    if name == "builtin":
        if dataset.unlabeled is None:
            raise LLTError(f"data.pool: dataset {dataset.name!r} ships no unlabeled images; choose another pool")
        images, source = dataset.unlabeled, f"{dataset.name} (held-out, label-free)"
    elif name == "tinyimagenet32":
        array = Path(d.data_dir).expanduser() / POOL_ARRAY_NAME
        folder = Path(d.data_dir).expanduser() / "tiny-imagenet-200"
        if array.is_file():
            images, source = torch.from_numpy(np.array(load_image_array(array)[0])), str(array)
        elif folder.is_dir():
            pooled, cache = build_pool32(d.data_dir, d.cache_dir)
            images, source = torch.from_numpy(pooled), f"{folder} (resized to 32x32, cached in {cache})"
        else:
            raise LLTError(f"data.pool=tinyimagenet32: neither {array} nor {folder} exists. Put the pool array "
                           f"there (unpack.py writes it), or choose data.pool=none or a path to an image array")
    else:
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = Path(d.data_dir).expanduser() / path
        if not path.is_file():
            raise LLTError(f"data.pool: the pool file {path} does not exist")
        images, source = torch.from_numpy(np.array(load_image_array(path)[0])), str(path)
    if tuple(images.shape[2:]) != tuple(dataset.image_shape[1:]):
        raise LLTError(f"data.pool: pool images are {images.shape[2]}x{images.shape[3]} but {dataset.name} images are "
                       f"{dataset.image_shape[1]}x{dataset.image_shape[2]}; resize the pool to match")
    if d.pool_size:
        images = images[: d.pool_size]
    return images, {"pool": name, "source": source, "num_images": int(images.shape[0]),
                    "content_sha256": sha256_bytes(images)}
