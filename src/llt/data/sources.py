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
    if d.pool_size:
        images = images[: d.pool_size]
    info = {"pool": name, "source": source, "num_images": int(images.shape[0])}
    target = tuple(dataset.image_shape[1:])
    if tuple(images.shape[2:]) != target:
        if not d.pool_resize:
            raise LLTError(f"data.pool: pool images are {images.shape[2]}x{images.shape[3]} but {dataset.name} images are "
                           f"{target[0]}x{target[1]}; use a pool of that size, or resize it with --set data.pool_resize=true")
        info["resized_from"] = list(images.shape[2:])
        images = resize_images(images, target)
    info["content_sha256"] = sha256_bytes(images)
    return images, info


def resize_images(images: torch.Tensor, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, *size): area filter when shrinking, bilinear when enlarging."""
    import torch.nn.functional as F

    mode = "area" if size[0] <= images.shape[2] else "bilinear"
    out = []
    for i in range(0, images.shape[0], chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=size, mode=mode,
                          **({"align_corners": False} if mode == "bilinear" else {}))
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)
