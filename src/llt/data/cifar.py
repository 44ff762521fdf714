"""CIFAR-10 and CIFAR-100 from the official python archives or their extracted folders.

Lookup order, for `cifar-10` (`cifar-100` alike):
1. DATA_DIR/cifar-10-batches-py/        an extracted folder: each file's MD5 is compared with the official one;
                                        a mismatch is reported loudly and recorded (status "modified"),
                                        or refused with data.require_official=true;
2. DATA_DIR/cifar-10-python.tar.gz      the official archive: its MD5 must match, then it is extracted
   (or the same name in the cache)      safely into the cache folder;
3. download into the cache folder, only when allowed (data.download=true or LLT_DOWNLOAD=1).
Decoded arrays are cached (keyed by the source files' size and mtime), so later loads skip decoding and
hashing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llt.data.dataset import ImageDataset, warn
from llt.data.files import (cache_root, download, download_allowed, md5_file, safe_extract,
                            safe_unpickle, source_fingerprint)
from llt.errors import LLTError
from llt.storage import atomic_save_npz


@dataclass(frozen=True)
class CifarSpec:
    name: str
    num_classes: int
    folder: str
    archive: str
    url: str
    archive_md5: str
    train_files: tuple[tuple[str, str], ...]
    test_files: tuple[tuple[str, str], ...]
    meta_file: tuple[str, str]
    label_key: bytes
    names_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def all_files(self):
        return self.train_files + self.test_files + (self.meta_file,)


# Official checksums published with the datasets (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10 = CifarSpec(
    name="cifar10", num_classes=10, folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive_md5="c58f30108f718f92721af3b95e74349a",
    train_files=(("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                 ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                 ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                 ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                 ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
    test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    meta_file=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    label_key=b"labels", names_key=b"label_names",
    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
)
CIFAR100 = CifarSpec(
    name="cifar100", num_classes=100, folder="cifar-100-python", archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
    test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    meta_file=("meta", "7973b15100ade9c7d40fb424638fde48"),
    label_key=b"fine_labels", names_key=b"fine_label_names",
    mean=(0.5071, 0.4866, 0.4409), std=(0.2009, 0.1984, 0.2023),
)
SPECS = {"cifar10": CIFAR10, "cifar100": CIFAR100}

DECODED_FORMAT = 1  # bump when the decoded cache layout changes


def _read_pickle(path: Path, expected_md5: str) -> dict:
    if not path.is_file():
        raise LLTError(f"missing file {path} (expected md5 {expected_md5})")
    obj = safe_unpickle(path.read_bytes(), f"{path} (expected md5 {expected_md5})")
    if not isinstance(obj, dict):
        raise LLTError(f"{path}: not a CIFAR batch (expected a dict; expected md5 {expected_md5})")
    return obj


def _read_batch(path: Path, expected_md5: str, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    obj = _read_pickle(path, expected_md5)
    data, labels = obj.get(b"data"), obj.get(spec.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise LLTError(f"{path}: b'data' is not a (N, 3072) uint8 array; the file is corrupt (expected md5 {expected_md5})")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],) or labels.min() < 0 or labels.max() >= spec.num_classes:
        raise LLTError(f"{path}: labels do not match the images; the file is corrupt (expected md5 {expected_md5})")
    return data.reshape(-1, 3, 32, 32), labels


def _verify_folder(folder: Path, spec: CifarSpec, require_official: bool) -> dict:
    """Compare every file of an extracted folder with the official MD5; return the provenance record."""
    files, mismatched = {}, []
    for fname, expected in spec.all_files():
        path = folder / fname
        if not path.is_file():
            raise LLTError(f"missing file {path} (expected md5 {expected}); "
                           f"the folder {folder} is incomplete")
        got = md5_file(path)
        files[fname] = {"md5": got, "expected_md5": expected, "matched": got == expected}
        if got != expected:
            mismatched.append(fname)
    if mismatched:
        msg = (f"{spec.name}: {len(mismatched)} of {len(files)} files in {folder} differ from the official release "
               f"({', '.join(mismatched)}). This is NOT the official {spec.name} data; results are not comparable "
               f"with published numbers. The mismatch is recorded in the run manifest.")
        if require_official:
            first = mismatched[0]
            raise LLTError(f"{folder / first}: md5 {files[first]['md5']} differs from the official "
                           f"{files[first]['expected_md5']} (data.require_official=true)")
        warn(msg)
    return {"source": str(folder), "kind": "extracted folder", "files": files,
            "checksums_matched": not mismatched, "status": "official" if not mismatched else "modified"}


def _find_source(spec: CifarSpec, data_dir: Path, cache: Path, allow_download: bool, opener) -> tuple[Path, dict | None]:
    """Return (extracted folder, archive provenance or None) following the lookup order above."""
    folder = data_dir / spec.folder
    if folder.is_dir():
        return folder, None
    for archive in (data_dir / spec.archive, cache / spec.archive):
        if archive.is_file():
            break
    else:
        cached_folder = cache / spec.folder
        if cached_folder.is_dir():
            return cached_folder, None
        if not allow_download:
            raise LLTError(
                f"{spec.name} not found: expected the folder {folder} or the archive {data_dir / spec.archive} "
                f"(md5 {spec.archive_md5}). Downloading is off; pass --download (or set LLT_DOWNLOAD=1) to fetch "
                f"it from {spec.url} into {cache}")
        archive = download(spec.url, cache / spec.archive, spec.archive_md5, opener=opener)
    got = md5_file(archive)
    if got != spec.archive_md5:
        raise LLTError(f"{archive}: md5 {got} does not match the official {spec.archive_md5}; "
                       f"the archive is corrupt or not the official release")
    if not (cache / spec.folder).is_dir():  # extracted before from the same verified archive: reuse
        safe_extract(archive, cache, members=[spec.folder])
    if not (cache / spec.folder).is_dir():
        raise LLTError(f"{archive}: the archive has no folder {spec.folder}/ (md5 matched, but the layout is wrong)")
    return cache / spec.folder, {"archive": str(archive), "archive_md5": got, "archive_matched": True}


def load_cifar(name: str, data_dir: str | Path, cache_dir: str = "", allow_download: bool = False,
               require_official: bool = False, opener=None) -> ImageDataset:
    """Load CIFAR-10 or CIFAR-100 as uint8 tensors (see the module docstring for the lookup order)."""
    spec = SPECS[name]
    data_dir, cache = Path(data_dir).expanduser(), cache_root(cache_dir)
    folder, archive_info = _find_source(spec, data_dir, cache, download_allowed(allow_download), opener)
    sources = [folder / f for f, _ in spec.all_files() if (folder / f).exists()]
    decoded = cache / "decoded" / f"{spec.name}-{source_fingerprint(sources)}-v{DECODED_FORMAT}.npz"
    if decoded.is_file():
        try:
            with np.load(decoded, allow_pickle=False) as z:
                provenance = json.loads(str(z["provenance"]))
                arrays = {k: z[k] for k in ("xtr", "ytr", "xte", "yte")}
            if not provenance.get("checksums_matched", False):
                if require_official:
                    raise LLTError(f"{folder}: files differ from the official {spec.name} release (data.require_official=true)")
                warn(f"{spec.name}: the data in {folder} differ from the official release (see the run manifest)")
            provenance["decoded_cache"] = str(decoded)
            return _make(spec, arrays, provenance)
        except (OSError, ValueError, KeyError):
            warn(f"ignoring unreadable decoded cache {decoded}; decoding again")
    t0 = time.perf_counter()
    provenance = _verify_folder(folder, spec, require_official)
    if archive_info:
        provenance.update(archive_info)
    xs, ys = zip(*(_read_batch(folder / f, md5, spec) for f, md5 in spec.train_files))
    xte, yte = zip(*(_read_batch(folder / f, md5, spec) for f, md5 in spec.test_files))
    meta = _read_pickle(folder / spec.meta_file[0], spec.meta_file[1])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(spec.names_key, [])]
    if len(names) != spec.num_classes:
        raise LLTError(f"{folder / spec.meta_file[0]}: expected {spec.num_classes} class names, found {len(names)} "
                       f"(expected md5 {spec.meta_file[1]})")
    provenance["class_names"] = names
    arrays = {"xtr": np.concatenate(xs), "ytr": np.concatenate(ys), "xte": np.concatenate(xte), "yte": np.concatenate(yte)}
    provenance["decode_seconds"] = round(time.perf_counter() - t0, 3)
    try:
        atomic_save_npz(decoded, provenance=np.array(json.dumps(provenance)), **arrays)
        provenance["decoded_cache"] = str(decoded)
    except OSError as e:  # a read-only cache only costs speed
        warn(f"could not write the decoded cache {decoded} ({e})")
    return _make(spec, arrays, provenance)


def _make(spec: CifarSpec, a: dict, provenance: dict) -> ImageDataset:
    return ImageDataset(
        name=spec.name,
        train_images=torch.from_numpy(a["xtr"]), train_labels=torch.from_numpy(a["ytr"].astype(np.int64)),
        test_images=torch.from_numpy(a["xte"]), test_labels=torch.from_numpy(a["yte"].astype(np.int64)),
        num_classes=spec.num_classes, class_names=list(provenance.get("class_names", [])),
        mean=spec.mean, std=spec.std, provenance=provenance)
