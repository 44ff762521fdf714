"""Lottery teaching: the greedy kNN query against a plain reference, and the teaching set."""

import numpy as np
import pytest
import torch

from llt.data.augment import Normalizer, make_generator
from llt.models import build_model
from llt.teaching import build_teaching_set, greedy_knn


def reference_greedy_knn(ex: torch.Tensor, pool: torch.Tensor, k: int) -> list[int]:
    """The original's semantics, written plainly: exemplars in order, k nearest not-yet-taken pool images
    each (ties to the lower pool index), union in selection order."""
    ex64, pool64 = ex.double(), pool.double()
    taken, order = set(), []
    for e in ex64:
        d = ((pool64 - e) ** 2).sum(1).tolist()
        ranked = sorted(range(len(d)), key=lambda j: (d[j], j))
        pick = [j for j in ranked if j not in taken][:k]
        taken.update(pick)
        order += pick
    return order


def int_features(n, d, high, seed):
    """Small integer features: distances are exact in float32 and ties are frequent."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, d), generator=g).float()


@pytest.mark.parametrize("n_ex, n_pool, k, high, chunk, extra", [
    (20, 300, 5, 4, 7, 3),      # many ties, small candidate margin: the exact fallback runs often
    (20, 300, 5, 4, 1024, None),
    (30, 100, 5, 3, 8, 1),      # pool exhausted after 20 exemplars
    (6, 40, 10, 2, 4, 0),       # heavy ties, exhaustion, no margin at all
    (15, 500, 8, 50, 5, None),  # few ties: the candidate path decides almost everything
])
def test_greedy_knn_matches_the_plain_reference(n_ex, n_pool, k, high, chunk, extra):
    ex = int_features(n_ex, 6, high, 1)
    pool = int_features(n_pool, 6, high, 2)
    got = greedy_knn(ex, pool, k, chunk=chunk, extra=extra).tolist()
    assert got == reference_greedy_knn(ex, pool, k)
    assert len(got) == len(set(got)) == min(n_pool, n_ex * k)


def test_duplicate_pool_images_are_taken_in_index_order():
    pool = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    ex = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert greedy_knn(ex, pool, 2, extra=0).tolist() == [1, 2, 3, 0]


def test_exhausted_pool_selects_everything_once():
    pool = int_features(12, 3, 5, 3)
    got = greedy_knn(int_features(9, 3, 5, 4), pool, 4)
    assert sorted(got.tolist()) == list(range(12))


def test_teaching_set_holds_frozen_augmented_images_and_teacher_logits():
    teacher = build_model(3, 2, width=4, seed=0)
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=g)
    memory = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")
    ts = build_teaching_set(teacher, pool, memory, num_heads=2, k=5, normalizer=norm,
                            generator=make_generator(0, "cpu"))
    assert ts.images.shape == (20, 3, 16, 16) and ts.images.dtype == torch.uint8
    assert ts.logits_main.shape == ts.logits_aux.shape == (20, 4) and len(set(ts.pool_idx.tolist())) == 20
    teacher.eval()
    with torch.no_grad():
        f = teacher.features(norm(ts.images))
        assert torch.allclose(ts.logits_main, teacher.head_logits(f, 2, "main"), atol=1e-5)
        assert torch.allclose(ts.logits_aux, teacher.head_logits(f, 2, "aux"), atol=1e-5)
    # the stored images are crops/flips of the selected pool images (not the raw images in general)
    assert not torch.equal(ts.images, pool[ts.pool_idx])
    again = build_teaching_set(teacher, pool, memory, 2, 5, norm, make_generator(0, "cpu"))
    assert torch.equal(again.images, ts.images) and torch.equal(again.pool_idx, ts.pool_idx)
    assert np.array_equal(again.logits_main.numpy(), ts.logits_main.numpy())
