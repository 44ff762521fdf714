"""Tiny-ImageNet-200 from its standard folder layout, decoded once into a cached array file.

    tiny-imagenet-200/wnids.txt                    200 class ids (wnids), one per line
    tiny-imagenet-200/words.txt                    optional: wnid<TAB>names
    tiny-imagenet-200/train/<wnid>/images/*.JPEG   500 training images per class
    tiny-imagenet-200/val/images/*.JPEG            10,000 validation images (used as the test set)
    tiny-imagenet-200/val/val_annotations.txt      file<TAB>wnid<TAB>box...

The cache file name carries a fingerprint of every source file (path, size, mtime), so editing, adding or
removing any image invalidates it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llt.data.dataset import ImageDataset
from llt.data.files import cache_root, sha256_bytes, source_fingerprint
from llt.errors import LLTError
from llt.storage import atomic_save_npz

FOLDER = "tiny-imagenet-200"
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
DECODED_FORMAT = 1


def _decode(paths: list[Path], desc: str, size: int = 64) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # only needed when decoding
    from tqdm import tqdm

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", mininterval=1.0, leave=False)):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    raise LLTError(f"{p}: image is {im.size[0]}x{im.size[1]}, Tiny-ImageNet images are {size}x{size}")
                out[i] = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise LLTError(f"{p}: cannot decode image ({e})") from None
    return out.transpose(0, 3, 1, 2)


def _scan(root: Path):
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise LLTError(f"missing file {wnids_file}: {root} is not a tiny-imagenet-200 folder")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    if len(set(wnids)) != len(wnids) or not wnids:
        raise LLTError(f"{wnids_file}: class ids must be unique and non-empty")
    index = {w: i for i, w in enumerate(wnids)}
    train, ytr = [], []
    for w in wnids:
        d = root / "train" / w / "images"
        files = sorted(d.glob("*.JPEG")) if d.is_dir() else []
        if not files:
            raise LLTError(f"missing training images in {d}")
        train += files
        ytr += [index[w]] * len(files)
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise LLTError(f"missing file {ann}")
    val, yte = [], []
    for line_no, line in enumerate(ann.read_text().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise LLTError(f"{ann}:{line_no}: unknown class id {parts[1]!r}")
        p = root / "val" / "images" / parts[0]
        if not p.is_file():
            raise LLTError(f"missing file {p} (listed in {ann})")
        val.append(p)
        yte.append(index[parts[1]])
    names = list(wnids)
    words = root / "words.txt"
    if words.is_file():
        table = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
        names = [table.get(w, w).split(",")[0].strip() for w in wnids]
    return wnids, names, train, np.array(ytr, np.int64), val, np.array(yte, np.int64)


def load_tinyimagenet(data_dir: str | Path, cache_dir: str = "") -> ImageDataset:
    root = Path(data_dir).expanduser() / FOLDER
    if not root.is_dir():
        raise LLTError(f"tinyimagenet not found: expected the folder {root} (the official tiny-imagenet-200 layout)")
    wnids, names, train, ytr, val, yte = _scan(root)
    fp = source_fingerprint(train + val + [root / "wnids.txt", root / "val" / "val_annotations.txt"])
    cache = cache_root(cache_dir) / "decoded" / f"tinyimagenet-{fp}-v{DECODED_FORMAT}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            xtr, xte, prov = z["xtr"], z["xte"], json.loads(str(z["provenance"]))
    else:
        xtr = _decode(train, "decoding Tiny-ImageNet train")
        xte = _decode(val, "decoding Tiny-ImageNet val")
        prov = {"source": str(root), "kind": "folder", "status": "unverified", "checksums_matched": None,
                "note": "Tiny-ImageNet publishes no per-file checksums; the content hash identifies the data",
                "content_sha256": sha256_bytes(xtr, ytr, xte, yte)}
        try:
            atomic_save_npz(cache, xtr=xtr, xte=xte, provenance=np.array(json.dumps(prov)))
        except OSError:
            pass
    prov = dict(prov, decoded_cache=str(cache), wnids=wnids)
    return ImageDataset(
        name="tinyimagenet", train_images=torch.from_numpy(xtr), train_labels=torch.from_numpy(ytr),
        test_images=torch.from_numpy(xte), test_labels=torch.from_numpy(yte), num_classes=len(wnids),
        class_names=names, mean=MEAN, std=STD, provenance=prov)


def build_pool32(data_dir: str | Path, cache_dir: str = "") -> tuple[np.ndarray, str]:
    """Tiny-ImageNet training images resized 64 -> 32 with a 2x2 box filter, (N, 3, 32, 32) uint8 (cached)."""
    ds = load_tinyimagenet(data_dir, cache_dir)
    x = ds.train_images.numpy().astype(np.uint16)
    n = x.shape[0]
    pooled = x.reshape(n, 3, 32, 2, 32, 2).sum(axis=(3, 5))
    return ((pooled + 2) // 4).astype(np.uint8), ds.provenance["decoded_cache"]
