"""Tiny-ImageNet folders, generic image arrays, the embedded digits and the unlabeled pool."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from conftest import make_tinyimagenet
from llt.config import DataSection
from llt.data.arrays import load_array_dataset, load_digits, load_image_array
from llt.data.sources import load_pool
from llt.data.tinyimagenet import build_pool32, load_tinyimagenet
from llt.errors import LLTError


# ------------------------------------------------------------------------------------------ Tiny-ImageNet

def test_tinyimagenet_folder_layout(tmp_path):
    make_tinyimagenet(tmp_path)
    ds = load_tinyimagenet(tmp_path)
    assert ds.train_images.shape == (12, 3, 64, 64) and ds.test_images.shape == (6, 3, 64, 64)
    assert ds.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test_labels.tolist() == [0, 0, 1, 1, 2, 2]          # from val_annotations.txt
    assert ds.class_names == ["thing 0", "thing 1", "thing 2"]     # from words.txt
    # constant-colour training images survive JPEG at quality 100 almost exactly
    assert abs(int(ds.train_images[5].float().mean().round()) - 11) <= 1


def test_tinyimagenet_cache_is_invalidated_when_an_image_changes(tmp_path):
    from PIL import Image

    base = make_tinyimagenet(tmp_path)
    load_tinyimagenet(tmp_path)
    caches = list((tmp_path / "cache" / "decoded").glob("tinyimagenet-*.npz"))
    assert len(caches) == 1
    again = load_tinyimagenet(tmp_path)
    assert again.provenance["decoded_cache"] == str(caches[0])
    img = base / "train" / "n00001000" / "images" / "n00001000_0.JPEG"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img, quality=100)
    os.utime(img, ns=(7, 7))
    changed = load_tinyimagenet(tmp_path)
    assert len(list((tmp_path / "cache" / "decoded").glob("tinyimagenet-*.npz"))) == 2
    assert abs(float(changed.train_images[0].float().mean()) - 200) < 2


def test_tinyimagenet_missing_pieces_are_named(tmp_path):
    base = make_tinyimagenet(tmp_path)
    (base / "val" / "val_annotations.txt").unlink()
    with pytest.raises(LLTError, match="missing file .*val_annotations.txt"):
        load_tinyimagenet(tmp_path)
    with pytest.raises(LLTError, match="expected the folder .*tiny-imagenet-200"):
        load_tinyimagenet(tmp_path / "nowhere")


def test_pool32_is_a_2x2_box_filter(tmp_path):
    make_tinyimagenet(tmp_path)
    pool, _ = build_pool32(tmp_path)
    ds = load_tinyimagenet(tmp_path)
    x = ds.train_images.numpy().astype(np.float64)
    expect = x.reshape(-1, 3, 32, 2, 32, 2).mean(axis=(3, 5))
    assert pool.shape == (12, 3, 32, 32) and pool.dtype == np.uint8
    assert np.abs(pool - expect).max() <= 0.5 + 1e-9


# ------------------------------------------------------------------------------------------ image arrays

def test_arrays_in_both_layouts(tmp_path):
    nhwc = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", nhwc)
    np.savez(tmp_path / "b.npz", images=nhwc.transpose(0, 3, 1, 2), labels=np.arange(5))
    a, la = load_image_array(tmp_path / "a.npy")
    b, lb = load_image_array(tmp_path / "b.npz")
    assert a.shape == (5, 3, 32, 32) and la is None
    assert np.array_equal(a, b) and lb.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(a[2, 1], nhwc[2, :, :, 1])


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 32, 32, 3), np.float32), "must be uint8, got dtype float32"),
    (np.zeros((4, 32, 32), np.uint8), r"must have shape \(N, H, W, 3\) or \(N, 3, H, W\), got \(4, 32, 32\)"),
    (np.zeros((4, 32, 32, 4), np.uint8), r"got \(4, 32, 32, 4\)"),
])
def test_wrong_shape_or_dtype_is_refused(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(LLTError, match=message):
        load_image_array(tmp_path / "bad.npy")


def test_object_arrays_are_never_unpickled(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LLTError, match="not a readable numpy array file"):
        load_image_array(tmp_path / "obj.npy")


def test_labelled_array_dataset(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", train_images=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8),
             train_labels=np.arange(12) % 4, test_images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             test_labels=np.arange(8) % 4)
    ds = load_array_dataset(tmp_path / "d.npz")
    assert ds.num_classes == 4 and ds.image_shape == (3, 16, 16)
    assert ds.provenance["status"] == "user" and len(ds.provenance["content_sha256"]) == 64
    np.savez(tmp_path / "e.npz", train_images=np.zeros((2, 16, 16, 3), np.uint8), train_labels=[0, 1])
    with pytest.raises(LLTError, match="missing arrays test_images, test_labels"):
        load_array_dataset(tmp_path / "e.npz")


# ------------------------------------------------------------------------------------------ digits

def test_embedded_digits_are_real_and_split_deterministically():
    ds = load_digits()
    assert ds.num_classes == 10 and ds.image_shape == (3, 32, 32) and ds.train_images.dtype == torch.uint8
    n_total = ds.train_labels.numel() + ds.test_labels.numel() + ds.unlabeled.shape[0]
    assert n_total == 1797
    assert 0.55 < ds.train_labels.numel() / n_total < 0.65
    assert torch.bincount(ds.test_labels).min() >= 35       # every class is in the test set
    again = load_digits()
    assert torch.equal(ds.train_images, again.train_images) and torch.equal(ds.test_labels, again.test_labels)
    # real images: grey (equal channels), a dark background and bright strokes
    assert torch.equal(ds.train_images[:, 0], ds.train_images[:, 1])
    assert ds.train_images.float().mean() < 100 and int(ds.train_images.max()) >= 250


# ------------------------------------------------------------------------------------------ pool

def _tiny_dataset(hw=32):
    from llt.data.dataset import ImageDataset

    x = torch.zeros(4, 3, hw, hw, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    return ImageDataset("t", x, y, x, y, 2, ["a", "b"], (0.5,) * 3, (0.25,) * 3)


def test_pool_from_array_none_and_size_limit(tmp_path):
    np.save(tmp_path / "tinyimagenet32-pool.npy", np.zeros((10, 32, 32, 3), np.uint8))
    d = DataSection(data_dir=str(tmp_path), pool="tinyimagenet32", pool_size=7)
    pool, info = load_pool(d, _tiny_dataset())
    assert pool.shape == (7, 3, 32, 32) and info["num_images"] == 7 and info["source"].endswith("tinyimagenet32-pool.npy")
    assert load_pool(dataclasses.replace(d, pool="none"), _tiny_dataset())[0] is None
    np.save(tmp_path / "mine.npy", np.zeros((3, 3, 32, 32), np.uint8))
    pool, info = load_pool(dataclasses.replace(d, pool="mine.npy", pool_size=0), _tiny_dataset())
    assert pool.shape[0] == 3


def test_pool_built_from_tinyimagenet_folder(tmp_path):
    make_tinyimagenet(tmp_path)
    pool, info = load_pool(DataSection(data_dir=str(tmp_path), pool="tinyimagenet32"), _tiny_dataset())
    assert pool.shape == (12, 3, 32, 32) and "resized to 32x32" in info["source"]


def test_missing_pool_and_wrong_size_are_clear_errors(tmp_path):
    with pytest.raises(LLTError, match="tinyimagenet32-pool.npy nor .*tiny-imagenet-200 exists"):
        load_pool(DataSection(data_dir=str(tmp_path)), _tiny_dataset())
    np.save(tmp_path / "big.npy", np.zeros((3, 64, 64, 3), np.uint8))
    with pytest.raises(LLTError, match="pool images are 64x64 but t images are 32x32.*data.pool_resize=true"):
        load_pool(DataSection(data_dir=str(tmp_path), pool="big.npy"), _tiny_dataset())
    resized, info = load_pool(DataSection(data_dir=str(tmp_path), pool="big.npy", pool_resize=True), _tiny_dataset())
    assert resized.shape == (3, 3, 32, 32) and info["resized_from"] == [64, 64]
    with pytest.raises(LLTError, match="ships no unlabeled images"):
        load_pool(DataSection(data_dir=str(tmp_path), pool="builtin"), _tiny_dataset())


def test_resize_is_an_area_mean_when_shrinking():
    from llt.data.sources import resize_images

    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).expand(2, 3, 4, 4).contiguous()
    y = resize_images(x, (2, 2))
    # 2x2 block means are 2.5, 4.5, 10.5, 12.5; torch.round takes halves to the even neighbour
    assert y[0, 0].tolist() == [[2, 4], [10, 12]] and y.dtype == torch.uint8
