"""Shared fixtures: small generated files in each real format. No test touches the network."""

from __future__ import annotations

import dataclasses
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from llt.data import cifar
from llt.data.files import md5_file

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and never downloads unless it asks to."""
    monkeypatch.setenv("LLT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLT_DOWNLOAD", raising=False)


def write_cifar_batch(path: Path, images: np.ndarray, labels, label_key=b"labels") -> None:
    """A batch with the official structure: dict of bytes keys, (N, 3072) uint8 data, protocol 2."""
    obj = {b"batch_label": b"generated batch", label_key: [int(v) for v in labels],
           b"data": images.reshape(len(images), 3072), b"filenames": [f"img{i}.png".encode() for i in range(len(images))]}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10_folder(root: Path, per_batch: int = 20, test: int = 20, seed: int = 0) -> Path:
    """DATA_DIR/cifar-10-batches-py with 5 small training batches, a test batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{k}", rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8),
                          [(i + k) % 10 for i in range(per_batch)])
    write_cifar_batch(folder / "test_batch", rng.integers(0, 256, (test, 3, 32, 32), dtype=np.uint8),
                      [i % 10 for i in range(test)])
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return folder


def make_cifar100_folder(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    write_cifar_batch(folder / "train", rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
                      [i % 100 for i in range(n_train)], label_key=b"fine_labels")
    write_cifar_batch(folder / "test", rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                      [i % 100 for i in range(n_test)], label_key=b"fine_labels")
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, protocol=2))
    return folder


def make_archive(folder: Path, archive: Path, extra: dict | None = None) -> Path:
    """tar.gz of `folder` (as its own name); `extra` maps member names to bytes (e.g. an escaping path)."""
    import io

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def trust_generated(monkeypatch, folder: Path, archive: Path | None = None, name: str = "cifar10"):
    """Make the generated files 'official' by patching the expected checksums to theirs."""
    spec = cifar.SPECS[name]
    files = lambda entries: tuple((f, md5_file(folder / f)) for f, _ in entries)  # noqa: E731
    patched = dataclasses.replace(
        spec, train_files=files(spec.train_files), test_files=files(spec.test_files),
        meta_file=(spec.meta_file[0], md5_file(folder / spec.meta_file[0])),
        archive_md5=md5_file(archive) if archive else spec.archive_md5)
    monkeypatch.setitem(cifar.SPECS, name, patched)
    return patched


def make_tinyimagenet(root: Path, num_classes: int = 3, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    from PIL import Image

    base = root / "tiny-imagenet-200"
    wnids = [f"n{1000 + i:08d}" for i in range(num_classes)]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("\n".join(f"{w}\tthing {i}, other" for i, w in enumerate(wnids)) + "\n")
    rng = np.random.default_rng(0)
    lines = []
    for c, w in enumerate(wnids):
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(train_per_class):
            Image.fromarray(np.full((64, 64, 3), 10 * c + j, np.uint8)).save(d / f"{w}_{j}.JPEG", quality=100)
        for j in range(val_per_class):
            name = f"val_{c}_{j}.JPEG"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "val" / "images" / name)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


class Evil:
    """Unpickling this runs code (creates a file) unless the unpickler refuses it."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


def full_disk(when) -> pytest.MonkeyPatch:
    """Make every atomic write of a path for which `when(path)` holds fail with ENOSPC (as a full disk
    does), for both the byte writer and the torch.save writer. Returns the patch; `.undo()` frees the disk."""
    import errno

    from llt import storage

    patch = pytest.MonkeyPatch()
    for name in ("atomic_write_bytes", "atomic_torch_save"):
        real = getattr(storage, name)

        def failing(path, obj, _real=real):
            if when(str(path)):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return _real(path, obj)

        patch.setattr(storage, name, failing)
    return patch


BU_TINY = ["--set", "run.method=bu", "--set", "model.width=4", "--set", "train.epochs=2", "--set", "train.milestones=[1]",
           "--set", "data.num_tasks=3", "--set", "data.exemplars_per_class=5", "--set", "train.batch_size=32",
           "--set", "prune.rate=0.2", "--set", "prune.finetune_epochs=1", "--set", "prune.max_rounds=2",
           "--set", "prune.retrain_after=false"]


@pytest.fixture(scope="session")
def grown(tmp_path_factory):
    """A tiny finished Bottom-Up run in which every task re-grows (accept forced off) and the stop rules
    never fire, so every loop runs to the cap: masks that really grow. Shared by the Bottom-Up and the
    lottery-control tests (read-only: tests copy it before changing anything)."""
    from llt.cli import main
    from llt.methods import bottomup

    mp = pytest.MonkeyPatch()
    mp.setattr(bottomup, "accept_ticket", lambda gap, decay: False)
    mp.setattr(bottomup, "first_task_rule_broken", lambda *a: False)
    mp.setattr(bottomup, "regrow_rule_broken", lambda *a: False)
    out = tmp_path_factory.mktemp("bu")
    try:
        assert main(["run", "--preset", "demo", "--out", str(out), "--quiet", *BU_TINY]) == 0
    finally:
        mp.undo()
    [rd] = list(out.iterdir())
    return rd
