"""The class-incremental stream: orders, remapping, split, exemplars, memory, determinism."""

import numpy as np
import pytest
import torch

from llt.data.stream import (CIFAR10_ORDER, build_stream, default_class_order, herding_exemplars, remap_labels,
                             split_train_val)
from llt.errors import LLTError


def labels(num_classes, per_class):
    return torch.arange(num_classes).repeat_interleave(per_class)[torch.randperm(num_classes * per_class,
                                                                                  generator=torch.Generator().manual_seed(3))]


def cifar_like(per_class=50, test_per_class=10, **kw):
    return build_stream("cifar10", labels(10, per_class), labels(10, test_per_class), 10,
                        classes_per_task=kw.pop("classes_per_task", 2), **kw)


def test_default_orders():
    assert default_class_order("cifar10", 10) == (9, 8, 7, 1, 5, 0, 3, 4, 6, 2)
    order = default_class_order("cifar100", 100)
    assert order == tuple(np.random.RandomState(1993).permutation(100).tolist())
    assert order[:5] == (68, 56, 78, 8, 23) and sorted(order) == list(range(100))
    assert default_class_order("digits", 10) == tuple(range(10))


def test_labels_are_remapped_to_positions_in_the_order():
    y = torch.tensor([9, 8, 2, 0])
    assert remap_labels(y, CIFAR10_ORDER).tolist() == [0, 1, 9, 5]


def test_tasks_own_consecutive_labels_and_the_right_classes():
    s = cifar_like(exemplars_per_class=5)
    assert [t.classes for t in s.tasks] == [(9, 8), (7, 1), (5, 0), (3, 4), (6, 2)]
    for t in s.tasks:
        assert t.labels == (2 * t.index, 2 * t.index + 1)
        assert set(s.train_labels[t.train_idx].tolist()) == set(t.labels)
        assert set(s.train_labels[t.val_idx].tolist()) == set(t.labels)
        assert set(s.test_labels[t.test_idx].tolist()) == set(t.labels)
        assert t.test_idx.numel() == 20


def test_split_is_per_class_nine_to_one_disjoint_and_complete():
    y = labels(10, 50)
    tr, va = split_train_val(y, 0.1, seed=0)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 500
    assert torch.bincount(y[va], minlength=10).tolist() == [5] * 10
    assert torch.equal(split_train_val(y, 0.1, seed=0)[1], va)
    assert not torch.equal(split_train_val(y, 0.1, seed=1)[1], va)


def test_exemplars_come_from_the_train_split_of_their_class():
    s = cifar_like(exemplars_per_class=7, seed=4)
    val = set(torch.cat([t.val_idx for t in s.tasks]).tolist())
    for lab, idx in s.exemplars.items():
        assert idx.numel() == 7 and len(set(idx.tolist())) == 7
        assert (s.train_labels[idx] == lab).all() and val.isdisjoint(idx.tolist())
    assert s.memory(0).numel() == 0
    assert sorted(set(s.train_labels[s.memory(3)].tolist())) == [0, 1, 2, 3, 4, 5]   # classes of tasks 1..3
    assert s.memory(3).numel() == 6 * 7


def test_exemplars_capped_by_available_images():
    s = cifar_like(per_class=20, exemplars_per_class=100)
    assert all(idx.numel() == 18 for idx in s.exemplars.values())   # 20 minus the 2 validation images


def test_stream_is_reproducible_from_the_seed_and_described_in_the_manifest():
    a, b, c = cifar_like(seed=11, exemplars_per_class=5), cifar_like(seed=11, exemplars_per_class=5), cifar_like(seed=12, exemplars_per_class=5)
    assert a.manifest() == b.manifest()
    assert a.manifest()["sha256_val_idx"] != c.manifest()["sha256_val_idx"]
    m = a.manifest()
    assert m["class_order"] == list(CIFAR10_ORDER) and m["seed"] == 11 and m["val_fraction"] == 0.1
    assert set(m) >= {"classes_per_task", "num_tasks", "exemplars_per_class", "exemplar_selection", "sha256_exemplars"}
    state = a.state_dict()
    assert torch.equal(state["task2.val_idx"], a.tasks[1].val_idx)


def test_custom_order_and_fewer_tasks():
    order = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    s = cifar_like(class_order=order, num_tasks=3, classes_per_task=3 - 1)
    assert s.num_tasks == 3 and s.tasks[2].classes == (4, 5)


@pytest.mark.parametrize("kw, message", [
    ({"classes_per_task": 3}, "10 classes are not divisible into tasks of 3 classes"),
    ({"class_order": (0, 1, 2, 3, 4, 5, 6, 7, 8, 8)}, r"not a permutation of 0..9 .*missing \[9\], repeated \[8\]"),
    ({"class_order": (0, 1, 2)}, "not a permutation"),
    ({"num_tasks": 6}, "6 tasks of 2 classes need 12 classes"),
])
def test_bad_streams_are_refused(kw, message):
    with pytest.raises(LLTError, match=message):
        cifar_like(**kw)


def test_herding_tracks_the_class_mean():
    # Points on a circle plus one at the mean direction: herding takes the mean-most point first, and
    # two opposite points next-best balance each other.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    order = herding_exemplars(f, 3)
    assert order.numel() == 3 and len(set(order.tolist())) == 3
    mu = torch.nn.functional.normalize(f, dim=1).mean(0)
    first = int(torch.argmin(((torch.nn.functional.normalize(f, dim=1) - mu) ** 2).sum(1)))
    assert order[0] == first
    assert herding_exemplars(f, 10).numel() == 5


def test_a_per_class_training_subset_keeps_validation_and_is_seeded():
    y = torch.arange(10).repeat_interleave(50)                 # 50 images per class
    full = build_stream("toy", y, y, 10, classes_per_task=2, exemplars_per_class=3, seed=4)
    small = build_stream("toy", y, y, 10, classes_per_task=2, exemplars_per_class=3, seed=4, train_per_class=7)
    again = build_stream("toy", y, y, 10, classes_per_task=2, exemplars_per_class=3, seed=4, train_per_class=7)
    for a, b, c in zip(full.tasks, small.tasks, again.tasks):
        assert torch.equal(a.val_idx, b.val_idx)               # validation unchanged
        assert set(b.train_idx.tolist()) < set(a.train_idx.tolist())
        assert b.train_idx.numel() == 14 and torch.bincount(y[b.train_idx], minlength=10)[list(a.labels)].tolist() == [7, 7]
        assert torch.equal(b.train_idx, c.train_idx)
    assert all(set(small.exemplars[lab].tolist()) <= set(small.tasks[lab // 2].train_idx.tolist()) for lab in range(10))
