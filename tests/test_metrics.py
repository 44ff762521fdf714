"""Metrics on hand-made matrices (the worked examples of docs/metrics.md) and the evaluation protocol."""

import math

import pytest
import torch

from llt.data.augment import Normalizer
from llt.data.stream import build_stream
from llt.evaluation import accuracy
from llt.metrics import (average_incremental_accuracy, backward_transfer, forgetting, learning_accuracy,
                         mean_learning_accuracy, per_class_accuracy, standard_accuracy, summarize)
from llt.models import build_model

R = [[90.0], [80.0, 70.0], [60.0, 50.0, 40.0]]


def test_standard_accuracy_is_the_row_mean():
    assert standard_accuracy(R) == [90.0, 75.0, 50.0]


def test_average_incremental_accuracy():
    assert average_incremental_accuracy(R) == pytest.approx([90.0, 82.5, 215.0 / 3])


def test_forgetting_uses_the_best_earlier_accuracy():
    # t=1: 90-80 = 10; t=2: task 0 best 90 -> 60 (30), task 1 best 70 -> 50 (20): mean 25
    assert forgetting(R) == [None, 10.0, 25.0]
    # an old task that improved later: its best earlier value counts, not its first
    assert forgetting([[50.0], [70.0, 90.0], [60.0, 90.0, 80.0]])[2] == pytest.approx((10.0 + 0.0) / 2)


def test_backward_transfer():
    assert backward_transfer(R) == [None, -10.0, -25.0]
    assert backward_transfer([[50.0], [70.0, 90.0]])[1] == 20.0


def test_learning_accuracy_is_the_diagonal_and_its_means():
    # docs/metrics.md: LA = 90, 70, 40; over tasks 1..3 (90 + 70 + 40) / 3 = 66.67; over 2..3 (70 + 40) / 2 = 55
    assert learning_accuracy(R) == [90.0, 70.0, 40.0]
    assert mean_learning_accuracy(R) == pytest.approx(200.0 / 3)
    assert mean_learning_accuracy(R, first=2) == 55.0
    assert mean_learning_accuracy([[90.0]], first=2) is None           # one task: none learned incrementally
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    assert (f"LA = (90 + 70 + 40) / 3 = {mean_learning_accuracy(R):.2f}; "
            f"LA' = (70 + 40) / 2 = {mean_learning_accuracy(R, first=2):g}.") in doc
    m = summarize(R)
    assert (m["learning_accuracy"], m["mean_learning_accuracy_incremental"]) == ([90.0, 70.0, 40.0], 55.0)
    # a task first unlearned, then learned once old, still counts as unlearned when it arrived
    assert learning_accuracy([[85.0], [60.0, 0.0], [65.0, 50.0, 0.0]]) == [85.0, 0.0, 0.0]


def test_square_matrix_with_nan_above_the_diagonal_is_accepted():
    sq = [[90.0, math.nan, math.nan], [80.0, 70.0, math.nan], [60.0, 50.0, 40.0]]
    assert summarize(sq) == summarize(R)
    with pytest.raises(ValueError, match="row 1 must hold 2 numbers"):
        standard_accuracy([[90.0], [80.0]])


def test_per_class_accuracy():
    assert per_class_accuracy([0, 1, 1, 2, 0], [0, 1, 0, 2, 0], 4) == [pytest.approx(200 / 3), 100.0, 100.0, None]


def test_evaluation_is_task_agnostic_over_seen_heads_only():
    # 2 classes per task; task test sets are balanced. Make the model's prediction depend only on the
    # head biases: zero head weights, so the arg-max is the largest bias among the seen heads.
    y = torch.arange(6).repeat_interleave(4)
    s = build_stream("toy", y, y, 6, classes_per_task=2, exemplars_per_class=0)
    model = build_model(3, 2, width=4, seed=0)
    with torch.no_grad():
        for branch in (model.heads_main, model.heads_aux):
            for h in branch:
                h.weight.zero_()
                h.bias.zero_()
        model.heads_main[1].bias.copy_(torch.tensor([5.0, 0.0]))   # label 2 wins among heads 1..2
        model.heads_main[2].bias.copy_(torch.tensor([0.0, 9.0]))   # label 5 would win if head 3 were scored
        model.heads_aux[0].bias.fill_(100.0)                       # the aux branch is never evaluated
    images = torch.zeros(24, 3, 8, 8, dtype=torch.uint8)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")
    out = accuracy(model, images, s.test_labels, [task.test_idx for task in s.tasks[:2]], norm)
    assert out["row"] == [0.0, 50.0]                 # task 0: nothing right; task 1: all of label 2
    assert out["overall"] == 25.0
    assert out["per_class"] == [0.0, 0.0, 100.0, 0.0]
    assert accuracy(model, images, s.test_labels, [task.test_idx for task in s.tasks], norm)["row"] == [0.0, 0.0, 50.0]


def test_student_t_quantiles_and_intervals():
    from llt.metrics import mean_interval, paired_difference, student_t_cdf, student_t_quantile

    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)):     # published 0.975 quantiles
        assert round(student_t_quantile(0.975, df), 3) == q
    assert student_t_cdf(0.0, 3) == pytest.approx(0.5) and student_t_quantile(0.025, 5) == pytest.approx(-2.5706, abs=1e-4)
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["half"] == pytest.approx(4.302653 * 1.0 / 3 ** 0.5, rel=1e-6)
    assert mean_interval([4.0]) == {"mean": 4.0, "half": None, "low": None, "high": None, "n": 1}
    d = paired_difference({0: 3.0, 1: 5.0, 2: 1.0}, {0: 1.0, 1: 4.0, 7: 0.0})
    assert d["n"] == 2 and d["seeds"] == [0, 1] and d["mean"] == 1.5 and d["positive"] == 2
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
