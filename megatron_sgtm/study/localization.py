"""Localization comparisons of a study: SGTM's entries against Gradient Routing and the weak
filter, per width, budget and undiscovered rate (pure functions of the result rows).

A *cell* is one (size, tokens, rate). In it each method entry is a point (retain loss,
forget loss), averaged over seeds, after ablation and calibration. Without a trade-off curve
per method, two points compare on both axes: one is better when it has the higher forget
loss at no higher retain loss (Pareto); otherwise it is a trade-off, and its exchange rate
(forget nats gained per retain nat paid) is what "matched retain loss" would decide.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .methods import base_of

# A difference below this (nats) is a tie: the seed spread of these runs is a few 0.01.
TIE = 0.01


@dataclass(frozen=True)
class Point:
    retain: float
    forget: float
    retain_spread: float  # half the range over seeds (0 with one seed)
    forget_spread: float
    seeds: int


@dataclass(frozen=True)
class Comparison:
    size: str
    tokens: int
    tokens_per_param: float  # per non-embedding parameter
    rate: float
    method: str  # the SGTM entry
    reference: str  # the entry it is compared with
    d_retain: float  # method - reference (lower retain loss is better)
    d_forget: float  # method - reference (higher forget loss is better)
    verdict: str


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def cells(rows: list[dict]) -> dict[tuple, dict[str, Point]]:
    """(size, tokens, rate) -> entry name -> its seed-averaged point. Label-free entries
    (no rate) appear in every rate's cell of their size and budget."""
    done = [r for r in rows if r.get("status") == "done" and r.get("kind") == "main"
            and r.get("retain_loss") not in (None, "") and r.get("forget_loss") not in (None, "")]
    rates = sorted({float(r["rate"]) for r in done if r.get("rate") not in (None, "")})
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in done:
        for rate in ([float(r["rate"])] if r.get("rate") not in (None, "") else rates):
            groups[(r["size"], int(r["tokens"]), rate)][r["method"]].append(r)
    out = {}
    for key, by_method in groups.items():
        out[key] = {}
        for m, rs in by_method.items():
            ret = [float(r["retain_loss"]) for r in rs]
            fgt = [float(r["forget_loss"]) for r in rs]
            out[key][m] = Point(float(np.mean(ret)), float(np.mean(fgt)), _spread(ret),
                                _spread(fgt), len(rs))
    return dict(sorted(out.items()))


def verdict(method: Point, reference: Point, names: tuple[str, str], tie: float = TIE) -> str:
    """Who wins on the (retain, forget) plane, in words naming the two entries."""
    d_r, d_f = method.retain - reference.retain, method.forget - reference.forget
    a, b = names
    if abs(d_r) <= tie and abs(d_f) <= tie:
        return "tie"
    if d_r <= tie and d_f >= -tie:
        return f"{a} better"
    if d_r >= -tie and d_f <= tie:
        return f"{b} better"
    # A trade-off: one forgets more and pays retain loss for it.
    winner, rate = (a, d_f / d_r) if d_f > 0 else (b, d_f / d_r)
    return f"trade-off: {winner} forgets more, {rate:.1f} forget nats per retain nat"


def entries_by_base(rows: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r.get("kind") == "main" and r.get("method") and r["method"] not in out[base_of(r)]:
            out[base_of(r)].append(r["method"])
    return dict(out)


def non_embedding_params(rows: list[dict]) -> dict[str, float]:
    """Size name -> its (dense) non-embedding parameter count, from the finished runs' rows;
    MoE entries' rows, whose parameters exceed what a token uses, are left out."""
    return {r["size"]: float(r["non_embedding_params"]) for r in rows
            if r.get("status") == "done" and r.get("non_embedding_params") not in (None, "")
            and r.get("active_non_embedding_params") in (None, "", r["non_embedding_params"])}


def comparisons(rows: list[dict]) -> list[Comparison]:
    """Every SGTM entry against every Gradient Routing and weak-filter entry, per cell."""
    by_base = entries_by_base(rows)
    ne_params = non_embedding_params(rows)
    refs = by_base.get("gradient_routing", []) + by_base.get("weak_filter", [])
    out = []
    for (size, tokens, rate), points in cells(rows).items():
        for m in by_base.get("sgtm", []):
            for ref in refs:
                if m not in points or ref not in points:
                    continue
                p, q = points[m], points[ref]
                out.append(Comparison(size, tokens, tokens / ne_params[size], rate, m, ref,
                                      p.retain - q.retain, p.forget - q.forget,
                                      verdict(p, q, (m, ref))))
    return out


def trend(comps: list[Comparison], method: str, reference: str, rate: float, size: str
          ) -> Optional[float]:
    """Slope of the forget-loss gap (method - reference) per doubling of the budget
    (least squares over the budgets); None with fewer than two budgets."""
    pts = sorted((c.tokens_per_param, c.d_forget) for c in comps
                 if (c.method, c.reference, c.rate, c.size) == (method, reference, rate, size))
    if len(pts) < 2:
        return None
    x = np.log2([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])
