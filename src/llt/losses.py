"""Loss terms of METHOD section 3, as plain functions of logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llt.subbatches import balanced_sizes  # noqa: F401  (part of this module's interface)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KD(s, t) = T^2 * mean_batch( -sum_c softmax(t/T)_c * log_softmax(s/T)_c ) (the original's loss_fn_kd).

    Cross-entropy to the teacher's soft targets (same gradient as KL). `student` and `teacher` are raw
    logits (N, C) over the same (old) classes.
    """
    t = temperature
    soft = F.softmax(teacher.float() / t, dim=1)
    return -(soft * F.log_softmax(student.float() / t, dim=1)).sum(1).mean() * (t * t)


def balanced_coefficients(sub_batch: int, num_old_tasks: int) -> tuple[float, float]:
    """coef_new = floor(b/(k+1))/b, coef_old = floor(b*k/(k+1))/b (they need not sum to 1, as in the original)."""
    n_new, n_old = balanced_sizes(sub_batch, num_old_tasks)
    return n_new / sub_batch, n_old / sub_batch
