"""The paper's derived metrics as pure functions (SGTM.md section 7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


class MetricError(ValueError):
    """Inputs from which the metric is undefined."""


@dataclass(frozen=True)
class Leakage:
    equivalent_forget_tokens: float
    leakage: float
    # None inside the baseline series; "above" (forget loss above every baseline: clamped to
    # the fewest forget tokens, a lower bound) or "below" (clamped to the most: an upper bound
    # on what the series can tell).
    clamped: Optional[str]


def equivalent_forget_tokens(forget_loss: float, series: Sequence[tuple[float, float]]
                             ) -> tuple[float, Optional[str]]:
    """Linear interpolation of ``forget_loss`` on baseline (forget tokens, forget loss) points.

    More forget tokens must give a lower loss: the series is sorted by tokens and must be
    strictly decreasing in loss, otherwise the inversion is ambiguous."""
    if len(series) < 2:
        raise MetricError("leakage needs at least two baseline runs")
    pts = sorted((float(t), float(l)) for t, l in series)
    tokens = np.array([p[0] for p in pts])
    losses = np.array([p[1] for p in pts])
    if np.any(np.diff(tokens) <= 0):
        raise MetricError("baseline series has duplicate forget-token counts")
    if np.any(np.diff(losses) >= 0):
        raise MetricError("baseline forget loss must fall strictly as forget tokens grow; got "
                          f"{losses.tolist()}")
    if forget_loss >= losses[0]:
        return float(tokens[0]), ("above" if forget_loss > losses[0] else None)
    if forget_loss <= losses[-1]:
        return float(tokens[-1]), ("below" if forget_loss < losses[-1] else None)
    # np.interp needs increasing x: interpolate over reversed (increasing) losses.
    return float(np.interp(forget_loss, losses[::-1], tokens[::-1])), None


def leakage(forget_loss: float, series: Sequence[tuple[float, float]],
            undiscovered_tokens: float) -> Leakage:
    """Equivalent forget tokens / undiscovered forget tokens the run saw (0 = nothing leaked)."""
    if undiscovered_tokens <= 0:
        raise MetricError("leakage is undefined when the run saw no undiscovered forget tokens")
    eq, clamped = equivalent_forget_tokens(forget_loss, series)
    return Leakage(eq, eq / undiscovered_tokens, clamped)


def training_compute(num_params: float, tokens: float) -> float:
    """C = 6 N D."""
    return 6.0 * float(num_params) * float(tokens)


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> tuple[float, float]:
    """Least squares of log l = log a - b log C; returns (a, b) with l = a C^(-b)."""
    c = np.asarray(compute, dtype=np.float64)
    l = np.asarray(loss, dtype=np.float64)
    if c.shape != l.shape or c.size < 2:
        raise MetricError("a power-law fit needs at least two (compute, loss) pairs")
    if np.any(c <= 0) or np.any(l <= 0):
        raise MetricError("compute and loss must be positive for a log-space fit")
    if np.unique(c).size < 2:
        raise MetricError("a power-law fit needs at least two distinct compute values")
    slope, intercept = np.polyfit(np.log(c), np.log(l), 1)
    return float(np.exp(intercept)), float(-slope)


def equivalent_compute(loss: float, a: float, b: float) -> float:
    if loss <= 0 or a <= 0 or b == 0:
        raise MetricError("equivalent compute needs loss > 0, a > 0 and b != 0")
    return float((loss / a) ** (-1.0 / b))


def compute_penalty(loss: float, method_compute: float, a: float, b: float) -> float:
    """(C_method - C_eq) / C_method: positive = the method needs more compute for this loss."""
    if method_compute <= 0:
        raise MetricError("method compute must be positive")
    c_eq = equivalent_compute(loss, a, b)
    return (method_compute - c_eq) / method_compute
