"""Class-incremental metrics as pure functions of the accuracy matrix (see docs/metrics.md).

The accuracy matrix R is lower-triangular and 0-based here: R[t][i] (percent) is the test accuracy on
the images of task i after learning tasks 0..t, predicted over all classes seen so far (i <= t). Rows
may be given as lists of length t+1 or as a square array with NaN above the diagonal.
"""

from __future__ import annotations

import math
from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _rows(R: Matrix) -> list[list[float]]:
    rows = [[float(v) for v in row[: t + 1]] for t, row in enumerate(R)]
    for t, row in enumerate(rows):
        if len(row) != t + 1 or any(math.isnan(v) for v in row):
            raise ValueError(f"accuracy matrix row {t} must hold {t + 1} numbers (tasks 0..{t}), got {row}")
    return rows


def standard_accuracy(R: Matrix) -> list[float]:
    """SA_t = mean_{i<=t} R[t][i]: the mean accuracy over seen tasks after each task."""
    return [sum(row) / len(row) for row in _rows(R)]


def average_incremental_accuracy(R: Matrix) -> list[float]:
    """A_t = mean_{l<=t} SA_l: the running mean of SA (Rebuffi et al., iCaRL)."""
    sa = standard_accuracy(R)
    return [sum(sa[: t + 1]) / (t + 1) for t in range(len(sa))]


def forgetting(R: Matrix) -> list[float | None]:
    """F_t = mean_{i<t} ( max_{i<=l<t} R[l][i] - R[t][i] ) (Chaudhry et al., 2018); None for t = 0.

    How far each old task has fallen below its best earlier accuracy, averaged over the old tasks.
    """
    rows = _rows(R)
    out: list[float | None] = [None]
    for t in range(1, len(rows)):
        drops = [max(rows[l][i] for l in range(i, t)) - rows[t][i] for i in range(t)]
        out.append(sum(drops) / t)
    return out


def backward_transfer(R: Matrix) -> list[float | None]:
    """BWT_t = mean_{i<t} ( R[t][i] - R[i][i] ) (Lopez-Paz and Ranzato, 2017); None for t = 0.

    Negative values mean that learning later tasks lowered the accuracy on earlier ones.
    """
    rows = _rows(R)
    out: list[float | None] = [None]
    for t in range(1, len(rows)):
        out.append(sum(rows[t][i] - rows[i][i] for i in range(t)) / t)
    return out


def per_class_accuracy(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> list[float | None]:
    """Percent of each class's images predicted correctly; None for classes without images."""
    hit = [0] * num_classes
    total = [0] * num_classes
    for p, y in zip(predictions, labels):
        total[int(y)] += 1
        hit[int(y)] += int(p) == int(y)
    return [100.0 * h / n if n else None for h, n in zip(hit, total)]


def summarize(R: Matrix) -> dict:
    """All matrix metrics at once (as written into summary.json)."""
    return {
        "sa": standard_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "backward_transfer": backward_transfer(R),
    }
