"""Tasks: losses and metrics against independent formulas, label checks, precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from randlift_dist.config_parse import ConfigError
from randlift_dist.tasks import LabelError, Task, check_labels


def test_mse_is_the_mean_squared_error_over_samples_and_outputs():
    t = Task("mse", 3)
    out, y = torch.randn(7, 3), torch.randn(7, 3)
    want = sum((float(out[i, j]) - float(y[i, j])) ** 2 for i in range(7) for j in range(3)) / 21
    assert float(t.loss(out, y)) == pytest.approx(want, rel=1e-6)
    s = t.sums(out, y)
    assert s["loss"] == pytest.approx(want * 7, rel=1e-6) and s["correct"] == 0
    assert t.metrics(s, 7, "test") == pytest.approx({"test_loss": want})
    assert not t.classification and t.metric_names == ("loss",)


def test_cross_entropy_and_accuracy_against_the_definition():
    t = Task("cross_entropy", 4)
    out = torch.randn(9, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    nll = [-(float(out[i, y[i]]) - math.log(sum(math.exp(float(v)) for v in out[i]))) for i in range(9)]
    hits = sum(int(max(range(4), key=lambda c: float(out[i, c])) == int(y[i])) for i in range(9))
    assert float(t.loss(out, y)) == pytest.approx(sum(nll) / 9, rel=1e-12)
    s = t.sums(out, y)
    assert s["loss"] == pytest.approx(sum(nll), rel=1e-12) and s["correct"] == hits == t.correct(out, y)
    m = t.metrics(s, 9, "train")
    assert m["train_accuracy"] == pytest.approx(hits / 9) and m["train_loss"] == pytest.approx(sum(nll) / 9)
    assert t.metrics({}, 0, "test") == {"test_loss": pytest.approx(float("nan"), nan_ok=True),
                                        "test_accuracy": pytest.approx(float("nan"), nan_ok=True)}


def test_cross_entropy_is_stable_for_huge_logits_and_runs_in_float32_for_bf16():
    t = Task("cross_entropy", 3)
    out = torch.tensor([[1e4, -1e4, 0.0], [-1e38, 1e38, 0.0]])
    y = torch.tensor([0, 0])
    loss = t.loss(out, y)
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(1e38, rel=1e-6)  # (0 + 2e38) / 2
    logits = torch.randn(16, 3)
    yy = torch.randint(0, 3, (16,))
    bf = logits.bfloat16()
    got = t.loss(bf, yy)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(torch.nn.functional.cross_entropy(bf.float(), yy)), rel=1e-7)


def test_label_checks_name_the_problem_and_the_fix():
    ce = Task("cross_entropy", 3)
    assert check_labels(ce, np.array([[0], [2], [1]], np.int32), "f").tolist() == [0, 2, 1]
    with pytest.raises(LabelError, match=r"f: .*floats.*cross_entropy.*integer"):
        check_labels(ce, np.array([0.0, 1.0]), "f")
    with pytest.raises(LabelError, match=r"1 labels outside \[0, 3\).*model.out_dim >= 4"):
        check_labels(ce, np.array([0, 3, 1]), "f")
    with pytest.raises(LabelError, match=r"outside \[0, 3\) \(e.g. -1"):
        check_labels(ce, np.array([0, -1]), "f")
    with pytest.raises(LabelError, match="10 classes but the readout has 3 outputs: set model.out_dim=10"):
        check_labels(ce, np.array([0, 1]), "f", classes=10)
    with pytest.raises(LabelError, match=r"shape \[N\]"):
        check_labels(ce, np.zeros((4, 2), np.int64), "f")
    mse = Task("mse", 2)
    assert check_labels(mse, np.ones((3, 2), np.float64), "f").dtype == np.float32
    assert check_labels(Task("mse", 1), np.arange(3), "f").shape == (3, 1)
    with pytest.raises(LabelError, match=r"\(3, 2\) do not fit the readout's 1 outputs"):
        check_labels(Task("mse", 1), np.ones((3, 2)), "f")
    assert issubclass(LabelError, ConfigError)  # exit status 2 through the entry point
