"""Lottery teaching (METHOD 3.3): query unlabeled images near the stored exemplars, record teacher logits.

After task t is learned, the teacher embeds every pool image and every exemplar of tasks 1..t. Going
through the exemplars in memory order, each takes its `k` nearest pool images (squared Euclidean
distance of the pooled features) that no earlier exemplar took; ties go to the lower pool index. The
union is augmented once (random crop and flip, then frozen) and the teacher's raw logits of heads 1..t
of both branches are stored with it.

The original rewrote every taken column of a full exemplars x pool distance matrix in host memory after
each exemplar (quadratic, 5.4 GB at 9k exemplars). Here distances are computed on the device in chunks of
exemplars; each exemplar's candidates come from one top-k per chunk and are checked against a boolean
"taken" mask. Only when the candidates cannot prove the answer (too many already taken, or a tie at the
candidate boundary) is that exemplar's full distance row recomputed: the result is the same set, in the
same order, as the plain greedy loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from llt.data.augment import Normalizer, crop_flip


@torch.no_grad()
def extract_features(model, images: torch.Tensor, normalizer: Normalizer, batch_size: int = 1024,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pooled features (N, D), float32 on the model's device, in eval mode without augmentation."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    out = []
    try:
        with ctx:
            for i in range(0, images.shape[0], batch_size):
                out.append(model.features(normalizer(images[i:i + batch_size].to(device))).float())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0, model.feature_dim, device=device)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for a (M, D) and b (N, D), float32, clamped at 0."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)).clamp_min_(0)


def greedy_knn(exemplars: torch.Tensor, pool: torch.Tensor, k: int, chunk: int = 1024, extra: int | None = None) -> torch.Tensor:
    """Greedy, order-dependent kNN query without replacement; returns pool indices in selection order.

    For each exemplar row in order: the `k` nearest pool rows not taken before (fewer once the pool runs
    out); ties broken by lower pool index. `chunk` exemplars share one distance block on the device;
    `extra` candidates beyond k (default k + 32) absorb images that earlier exemplars took.
    """
    n_pool = pool.shape[0]
    extra = k + 32 if extra is None else extra
    n_cand = min(n_pool, k + extra)
    taken = np.zeros(n_pool, dtype=bool)
    order: list[np.ndarray] = []
    for start in range(0, exemplars.shape[0], chunk):
        dist = squared_distances(exemplars[start:start + chunk].float(), pool.float())
        cand_d, cand_i = torch.topk(dist, n_cand, dim=1, largest=False, sorted=True)
        cand_d, cand_i = cand_d.cpu().numpy(), cand_i.cpu().numpy()
        for r in range(dist.shape[0]):
            if taken.all():
                return torch.from_numpy(np.concatenate(order)) if order else torch.empty(0, dtype=torch.int64)
            d, i = cand_d[r], cand_i[r]
            key = np.lexsort((i, d))                       # by distance, then pool index
            d, i = d[key], i[key]
            free = ~taken[i]
            # Exact when k free candidates exist and the k-th is strictly inside the candidate set
            # (every pool image at least as close is then a candidate).
            if free.sum() >= k and (n_cand == n_pool or d[free][k - 1] < d[-1]):
                pick = i[free][:k]
            else:
                row = dist[r].clone()
                row[torch.from_numpy(taken).to(row.device)] = float("inf")
                _, idx = torch.sort(row, stable=True)
                idx = idx[: min(k, int((~taken).sum()))].cpu().numpy()
                pick = idx
            taken[pick] = True
            order.append(pick)
    return torch.from_numpy(np.concatenate(order)).long() if order else torch.empty(0, dtype=torch.int64)


@dataclass
class TeachingSet:
    """Frozen-augmented unlabeled images (uint8, on CPU) with the teacher's raw logits of both branches."""

    images: torch.Tensor          # (U, 3, H, W) uint8, already augmented (no further augmentation)
    logits_main: torch.Tensor     # (U, t * C) float32
    logits_aux: torch.Tensor      # (U, t * C) float32
    pool_idx: torch.Tensor        # (U,) which pool images were selected, in selection order

    def state_dict(self) -> dict:
        return {"images": self.images, "logits_main": self.logits_main, "logits_aux": self.logits_aux,
                "pool_idx": self.pool_idx}

    @classmethod
    def from_state(cls, state: dict) -> "TeachingSet":
        return cls(state["images"], state["logits_main"], state["logits_aux"], state["pool_idx"])


@torch.no_grad()
def build_teaching_set(teacher, pool: torch.Tensor, memory_images: torch.Tensor, num_heads: int, k: int,
                       normalizer: Normalizer, generator: torch.Generator, batch_size: int = 1024,
                       autocast_dtype: torch.dtype | None = None) -> TeachingSet:
    """Query the pool with the teacher and record its logits on one frozen augmentation of the selection."""
    device = next(teacher.parameters()).device
    pool_f = extract_features(teacher, pool, normalizer, batch_size, autocast_dtype)
    ex_f = extract_features(teacher, memory_images, normalizer, batch_size, autocast_dtype)
    picked = greedy_knn(ex_f, pool_f, k)
    del pool_f, ex_f
    images, main, aux = [], [], []
    was = teacher.training
    teacher.eval()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        with ctx:
            for i in range(0, picked.numel(), batch_size):
                x = crop_flip(pool[picked[i:i + batch_size]].to(device), generator)
                f = teacher.features(normalizer(x))
                images.append(x.cpu())
                main.append(teacher.head_logits(f, num_heads, "main").float().cpu())
                aux.append(teacher.head_logits(f, num_heads, "aux").float().cpu())
    finally:
        teacher.train(was)
    empty = torch.empty(0, num_heads * teacher.classes_per_task)
    return TeachingSet(images=torch.cat(images) if images else pool[:0].clone(),
                       logits_main=torch.cat(main) if main else empty, logits_aux=torch.cat(aux) if aux else empty,
                       pool_idx=picked)
