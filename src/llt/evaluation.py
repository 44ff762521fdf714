"""Task-agnostic evaluation: one row of the accuracy matrix after learning tasks 0..t (test split), or the
same on the validation split for decisions.

The balanced (main) branch predicts over the concatenated logits of heads 1..t+1, i.e. over every class
seen so far (never over future heads: the original's test.py wrongly scored all heads). Accuracy is
computed separately on each seen task's test images.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from llt.data.augment import Normalizer
from llt.metrics import per_class_accuracy


@torch.no_grad()
def predict(model, images: torch.Tensor, num_heads: int, normalizer: Normalizer, batch_size: int = 1024,
            branch: str = "main", autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Arg-max predictions (CPU int64) of `model` in eval mode on uint8 `images` over heads 1..num_heads."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds = []
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        with ctx:
            for i in range(0, images.shape[0], batch_size):
                x = normalizer(images[i:i + batch_size].to(device, non_blocking=True))
                preds.append(model(x, num_heads, branch).argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, index_sets: list[torch.Tensor],
             normalizer: Normalizer, batch_size: int = 1024, autocast_dtype: torch.dtype | None = None,
             num_heads: int | None = None) -> dict:
    """THE accuracy function: the balanced branch's accuracy (percent) on each index set into
    `images`/`labels`, predicting over heads 1..num_heads (default: one head per index set, so that after
    tasks 0..t the sets of tasks 0..t score over exactly the classes seen so far).

    Returns {"row": [percent per set], "overall": percent over their union, "per_class": percent per label
    0..num_heads*C-1}. An empty set scores 0.
    """
    num_heads = len(index_sets) if num_heads is None else num_heads
    idx = torch.cat(index_sets) if index_sets else torch.empty(0, dtype=torch.int64)
    preds = predict(model, images[idx.to(images.device)], num_heads, normalizer, batch_size,
                    autocast_dtype=autocast_dtype)
    y = labels[idx.to(labels.device)].cpu()
    row, start = [], 0
    for s in index_sets:
        n = s.numel()
        row.append(100.0 * float((preds[start:start + n] == y[start:start + n]).float().mean()) if n else 0.0)
        start += n
    return {"row": row, "overall": 100.0 * float((preds == y).float().mean()) if y.numel() else 0.0,
            "per_class": per_class_accuracy(preds.tolist(), y.tolist(), num_heads * model.classes_per_task)}
