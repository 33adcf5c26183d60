"""Measured classifier quality against the recipe's ground truth.

The errors measured here are the classifier's own, never injected (see data_prep.noise).
A cascade is measured as a whole (its final scores, like any kind) and per stage: each
stage's own precision / recall at its threshold on the texts that reached it, and how many
of them it decided. Stage counts are sums, so each map task records its shard's and the
reduce adds them up.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from data_prep.classifiers.base import Trace
from data_prep.documents import FORGET
from data_prep.recipe import ClassifierConfig

COUNTS = ("seen", "decided", "true_positives", "false_positives", "false_negatives", "true_negatives")


def seed_mask(n: int, cfg: ClassifierConfig) -> np.ndarray:
    """Which train documents form the classifier's labelled seed split."""
    rng = np.random.default_rng([cfg.seed, 7])
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: max(1, int(round(cfg.seed_fraction * n)))]] = True
    return mask


def oracle_scores(truth: np.ndarray) -> np.ndarray:
    return (truth == FORGET).astype(np.float32)


def rates(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 from counts (1.0 where nothing was flagged / there was nothing to find)."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 6), "recall": round(recall, 6), "f1": round(f1, 6)}


def measure(scores: np.ndarray, truth: np.ndarray, threshold: float, evaluate: np.ndarray) -> dict:
    """Precision / recall / F1 of the thresholded classifier on the ``evaluate`` docs."""
    flag = scores[evaluate] >= threshold
    pos = truth[evaluate] == FORGET
    tp = int((flag & pos).sum())
    fp = int((flag & ~pos).sum())
    fn = int((~flag & pos).sum())
    return {**rates(tp, fp, fn), "true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "evaluated_docs": int(evaluate.sum()), "threshold": threshold}


def stage_counts(trace: Trace, truth: np.ndarray, stages: list[ClassifierConfig]) -> Optional[list[dict]]:
    """Per cascade stage: texts that reached it, how many it decided, and its confusion counts
    at its own threshold on those texts. None for a classifier without stages."""
    if trace.stage is None:
        return None
    out = []
    pos = truth == FORGET
    for k, st in enumerate(stages):
        s = trace.stage_scores[:, k]
        seen = ~np.isnan(s)
        flag = s[seen] >= st.threshold
        p = pos[seen]
        out.append({"seen": int(seen.sum()), "decided": int((trace.stage == k).sum()),
                    "true_positives": int((flag & p).sum()), "false_positives": int((flag & ~p).sum()),
                    "false_negatives": int((~flag & p).sum()), "true_negatives": int((~flag & ~p).sum())})
    return out


def add_counts(total: Optional[dict], part: Optional[dict]) -> Optional[dict]:
    """Sum ``{level: [per-stage counts]}`` records (None = nothing yet)."""
    if part is None:
        return total
    if total is None:
        return {level: [dict(c) for c in stages] for level, stages in part.items()}
    for level, stages in part.items():
        have = total.setdefault(level, [{k: 0 for k in COUNTS} for _ in stages])
        for acc, c in zip(have, stages):
            for k in COUNTS:
                acc[k] += c[k]
    return total


def stage_report(stages: list[ClassifierConfig], counts: dict) -> list[dict]:
    """The manifest's per-stage quality: counts and rates per level (document, paragraph)."""
    out = []
    for k, st in enumerate(stages):
        last = k == len(stages) - 1
        row = {"stage": k, "kind": st.kind, "threshold": st.threshold,
               "decides": "all" if last else (st.decides or "retain")}
        for level, per_stage in sorted(counts.items()):
            c = per_stage[k]
            row[level] = {**c, "passed": c["seen"] - c["decided"],
                          **rates(c["true_positives"], c["false_positives"], c["false_negatives"])}
        out.append(row)
    return out


def counts_from_report(stages: list[dict]) -> Optional[dict]:
    """The per-stage counts a manifest's ``classifier.stages`` holds (for ``--relabel``)."""
    if not stages:
        return None
    levels = [k for k in stages[0] if isinstance(stages[0][k], dict)]
    return {level: [{k: row[level][k] for k in COUNTS} for row in stages] for level in levels}
