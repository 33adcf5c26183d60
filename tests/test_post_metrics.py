"""Pure functions: leakage interpolation, power-law fit and compute penalty, baselines' sample
transforms, loss-distribution summary."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_sgtm.post import metrics
from megatron_sgtm.post.baselines import conditional_labels, conditional_tokens, slung_flags, slung_loss
from megatron_sgtm.post.evaluate import EvalError, loss_distribution

SERIES = [(0, 6.0), (1000, 4.0), (3000, 3.0)]


def test_leakage_interpolates_linearly():
    res = metrics.leakage(5.0, SERIES, undiscovered_tokens=2000)
    assert res.equivalent_forget_tokens == pytest.approx(500.0)
    assert res.leakage == pytest.approx(0.25)
    assert res.clamped is None
    assert metrics.leakage(3.5, list(reversed(SERIES)), 4000).equivalent_forget_tokens == \
        pytest.approx(2000.0)


def test_leakage_clamps_and_reports_out_of_range():
    above = metrics.leakage(7.0, SERIES, 1000)
    assert (above.equivalent_forget_tokens, above.leakage, above.clamped) == (0.0, 0.0, "above")
    below = metrics.leakage(2.0, SERIES, 1000)
    assert (below.equivalent_forget_tokens, below.clamped) == (3000.0, "below")
    edge = metrics.leakage(3.0, SERIES, 1000)
    assert (edge.equivalent_forget_tokens, edge.clamped) == (3000.0, None)


@pytest.mark.parametrize("series,undiscovered,match", [
    ([(0, 6.0)], 10, "at least two"),
    ([(0, 6.0), (10, 6.5)], 10, "fall strictly"),
    ([(0, 6.0), (0, 5.0)], 10, "duplicate"),
    (SERIES, 0, "no undiscovered"),
])
def test_leakage_rejects_undefined_inputs(series, undiscovered, match):
    with pytest.raises(metrics.MetricError, match=match):
        metrics.leakage(5.0, series, undiscovered)


def test_power_law_fit_recovers_exact_law_and_penalty():
    a, b = 37.5, 0.071
    compute = [1e15, 3e16, 8e17, 2e19]
    loss = [a * c ** (-b) for c in compute]
    fa, fb = metrics.fit_power_law(compute, loss)
    assert fa == pytest.approx(a, rel=1e-9) and fb == pytest.approx(b, rel=1e-9)
    # A method at 1e18 FLOPs reaching the loss the baseline gets at 8e17: penalty 0.2.
    c_method, c_eq = 1e18, 8e17
    penalty = metrics.compute_penalty(a * c_eq ** (-b), c_method, fa, fb)
    assert penalty == pytest.approx(0.2, rel=1e-7)
    # Better than the baseline: negative penalty (a compute gain).
    assert metrics.compute_penalty(a * 2e18 ** (-b), c_method, fa, fb) == pytest.approx(-1.0)
    assert metrics.training_compute(64e6, 1.2e9) == pytest.approx(6 * 64e6 * 1.2e9)


def test_power_law_rejects_bad_inputs():
    with pytest.raises(metrics.MetricError):
        metrics.fit_power_law([1e15], [3.0])
    with pytest.raises(metrics.MetricError):
        metrics.fit_power_law([1e15, 1e16], [3.0, -1.0])
    with pytest.raises(metrics.MetricError):
        metrics.fit_power_law([1e15, 1e15], [3.0, 2.9])
    with pytest.raises(metrics.MetricError):
        metrics.compute_penalty(3.0, 0.0, 1.0, 0.1)


def test_conditional_tokens_prepends_control_by_label():
    toks = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = conditional_tokens(toks, torch.tensor([2, 1]), good_id=1, bad_id=2)
    assert out.tolist() == [[2, 5, 6, 7], [1, 9, 10, 11]]
    per_token = torch.tensor([[0, 0, 2, 2], [1, 1, 1, 1]])
    assert conditional_tokens(toks, per_token, 1, 2).tolist() == [[2, 5, 6, 7], [1, 9, 10, 11]]
    assert conditional_tokens(torch.tensor([5, 6, 7]), 0, 1, 2).tolist() == [1, 5, 6]
    assert conditional_labels(per_token).tolist() == [[0, 0, 0, 2], [1, 1, 1, 1]]
    with pytest.raises(ValueError):
        conditional_tokens(toks, torch.tensor([2, 1, 0]), 1, 2)


def test_slung_masks_or_unlikelihoods_flagged_tokens():
    loss = torch.tensor([[1.0, 2.0, 0.5, 3.0]], requires_grad=True)
    flags = slung_flags(torch.tensor([[0, 2, 1, 2]]))
    total, count = slung_loss(loss, flags, "mask")
    assert total.item() == pytest.approx(1.5) and count.item() == 2
    total, count = slung_loss(loss, flags, "unlikelihood", loss_mask=torch.tensor([[1, 1, 1, 0]]))
    p = math.exp(-2.0)
    assert total.item() == pytest.approx(1.5 - math.log(1 - p)) and count.item() == 3
    total.backward()
    assert loss.grad[0, 3] == 0 and loss.grad[0, 1] < 0  # unlikelihood pushes p(target) down
    with pytest.raises(ValueError):
        slung_loss(loss, flags, "ignore")


def test_loss_distribution_summary():
    losses = np.array([0.5, 1.5, 2.5, 2.5, 30.0])
    d = loss_distribution(losses, bins=[0, 1, 2, 3])
    assert d["histogram"]["counts"] == [1, 1, 2] and d["above_range"] == 1
    assert d["quantiles"]["0.5"] == pytest.approx(2.5)
    with pytest.raises(EvalError):
        loss_distribution(np.array([]))
