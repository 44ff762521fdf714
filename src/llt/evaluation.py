"""Task-agnostic evaluation: one row of the accuracy matrix after learning tasks 0..t.

The balanced (main) branch predicts over the concatenated logits of heads 1..t+1, i.e. over every class
seen so far (never over future heads: the original's test.py wrongly scored all heads). Accuracy is
computed separately on each seen task's test images.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from llt.data.augment import Normalizer
from llt.data.stream import Stream
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


def task_accuracies(model, images: torch.Tensor, labels: torch.Tensor, index_sets: list[torch.Tensor],
                    normalizer: Normalizer, batch_size: int = 1024, autocast_dtype: torch.dtype | None = None) -> dict:
    """Accuracy (percent) on each index set, predicting over the heads of len(index_sets) tasks.

    Returns {"row": [acc per set], "overall": percent over the union, "per_class": percent per label}.
    """
    idx = torch.cat(index_sets)
    preds = predict(model, images[idx.to(images.device)], len(index_sets), normalizer, batch_size,
                    autocast_dtype=autocast_dtype)
    y = labels[idx.to(labels.device)].cpu()
    row, start = [], 0
    for s in index_sets:
        n = s.numel()
        row.append(100.0 * float((preds[start:start + n] == y[start:start + n]).float().mean()) if n else 0.0)
        start += n
    num_classes = len(index_sets) * model.classes_per_task
    return {"row": row, "overall": 100.0 * float((preds == y).float().mean()) if y.numel() else 0.0,
            "per_class": per_class_accuracy(preds.tolist(), y.tolist(), num_classes)}


def evaluate_seen_tasks(model, test_images: torch.Tensor, stream: Stream, t: int, normalizer: Normalizer,
                        batch_size: int = 1024, autocast_dtype: torch.dtype | None = None) -> dict:
    """Accuracy-matrix row t (percent per seen task), overall accuracy and per-class accuracy on the test set.

    Returns {"row": [R[t][0], ..., R[t][t]], "overall": percent over all seen test images,
    "per_class": percent per remapped label 0..seen-1}.
    """
    return task_accuracies(model, test_images, stream.test_labels, [task.test_idx for task in stream.tasks[: t + 1]],
                           normalizer, batch_size, autocast_dtype)
