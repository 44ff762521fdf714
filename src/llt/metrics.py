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


def learning_accuracy(R: Matrix) -> list[float]:
    """LA_t = R[t][t]: the accuracy on each task right after learning it (the matrix's diagonal)."""
    return [row[t] for t, row in enumerate(_rows(R))]


def mean_learning_accuracy(R: Matrix, first: int = 1) -> float | None:
    """The mean of R[t][t] over tasks first..T (1-based): first = 1 is the literature's learning accuracy
    (Riemer et al., 2019), first = 2 the tasks learned incrementally (beside old classes); None when the
    matrix has no such task."""
    la = learning_accuracy(R)[first - 1:]
    return sum(la) / len(la) if la else None


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
        "learning_accuracy": learning_accuracy(R),
        "mean_learning_accuracy": mean_learning_accuracy(R, 1),
        "mean_learning_accuracy_incremental": mean_learning_accuracy(R, 2),
    }


# ------------------------------------------------------------------------------------ statistics over seeds

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on the CDF, to 1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > p:
        lo *= 2.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean over seeds with a two-sided Student-t confidence interval: {"mean", "half", "low", "high", "n"}.
    `half` (the interval's half-width, t_{(1+level)/2, n-1} * s / sqrt(n)) and the bounds are None for
    n = 1: one seed gives no interval."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("no values")
    m = sum(vals) / n
    if n == 1:
        return {"mean": m, "half": None, "low": None, "high": None, "n": 1}
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    half = student_t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": m, "half": half, "low": m - half, "high": m + half, "n": n}


def paired_difference(a: dict, b: dict, level: float = 0.95) -> dict | None:
    """a - b over the keys (seeds) both have: the mean difference with its Student-t interval (the paired
    t interval: a t interval of the per-seed differences), n, and on how many seeds a - b > 0. None when no
    key is shared."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    diffs = [float(a[k]) - float(b[k]) for k in keys]
    return {**mean_interval(diffs, level), "positive": sum(d > 0 for d in diffs), "seeds": keys,
            "differences": diffs}
