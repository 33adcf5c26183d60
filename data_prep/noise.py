"""The label-noise policy: classifier flags + seeded, injected noise -> applied labels.

Applied label codes (the per-token sidecar): 0 = unlabeled, 1 = retain (masked retain
path), 2 = forget. The policy acts on *units*: documents, or at paragraph granularity
(``classifier.granularity: paragraph``) paragraph spans, each with its own truth and score;
read "document" below as "unit".

Semantics, in order:

1. **Classifier flags.** ``score >= threshold`` flags a document as forget. These
   carry the classifier's natural errors.
2. **Undiscovered rate** (1 - recall). Among true-forget documents the classifier
   flagged, un-flag just enough that the share of true-forget documents left
   unflagged is ``round(rate * n_forget) / n_forget``. When the classifier already
   misses more than that, nothing is un-flagged: natural errors add to injected noise,
   and the manifest records both ``classifier_undiscovered`` and the realised rate.
3. **False-positive rate.** The pool is the adjacent documents (``fp_pool: auto``
   uses them whenever the corpus has any; the bilingual recipe has none, so its pool
   is the true-retain documents). Pool documents are flagged until the flagged share of
   the pool reaches the target; natural false positives count toward it and are never
   removed, also those outside the pool.
4. **Retain-mode share.** Of the documents that are truly retain and not flagged, a
   seeded ``round(share * n)`` get label 1 (retain path); every other unflagged
   document, adjacent ones included, stays 0 (unlabeled).

Each step draws from its own uniform key per document (``numpy.default_rng(seed)``),
and picks the documents with the smallest keys. So the result is deterministic in the
seed, and raising a rate only adds documents to the affected set (nested sweeps).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.documents import ADJACENT, FORGET, RETAIN
from data_prep.recipe import NoiseConfig

UNLABELED, RETAIN_LABEL, FORGET_LABEL = 0, 1, 2
LABEL_NAMES = ("unlabeled", "retain", "forget")


@dataclass
class LabelResult:
    labels: np.ndarray  # uint8 per document
    report: dict


def _pick(candidates: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """The k candidate indices with the smallest keys."""
    if k <= 0 or len(candidates) == 0:
        return candidates[:0]
    return candidates[np.argsort(keys[candidates], kind="stable")[:k]]


def fp_pool_domain(policy: NoiseConfig, truth: np.ndarray) -> int:
    if policy.fp_pool == "adjacent" or (policy.fp_pool == "auto" and (truth == ADJACENT).any()):
        return ADJACENT
    return RETAIN


def _rate(num: float, den: float) -> float:
    return round(float(num) / float(den), 6) if den else 0.0


def apply_policy(truth: np.ndarray, scores: np.ndarray, lengths: np.ndarray,
                 threshold: float, policy: NoiseConfig) -> LabelResult:
    """Applied label per document, plus the realised rates (doc- and token-weighted)."""
    n = len(truth)
    rng = np.random.default_rng(policy.seed)
    key_undiscovered, key_fp, key_retain = rng.random(n), rng.random(n), rng.random(n)
    lengths = np.asarray(lengths, dtype=np.int64)

    clf_flag = scores >= threshold
    flag = clf_flag.copy()
    forget = truth == FORGET
    notes = []

    n_forget = int(forget.sum())
    target_missed = int(round(policy.undiscovered_rate * n_forget))
    natural_missed = int((forget & ~clf_flag).sum())
    if natural_missed > target_missed:
        notes.append(f"classifier misses {natural_missed} forget docs, more than the "
                     f"{target_missed} the undiscovered rate asks for; kept them all")
    flag[_pick(np.flatnonzero(forget & flag), key_undiscovered, target_missed - natural_missed)] = False

    pool_domain = fp_pool_domain(policy, truth)
    pool = truth == pool_domain
    n_pool = int(pool.sum())
    target_fp = int(round(policy.false_positive_rate * n_pool))
    natural_fp = int((pool & clf_flag).sum())
    if natural_fp > target_fp:
        notes.append(f"classifier flags {natural_fp} {('retain', 'forget', 'adjacent')[pool_domain]} "
                     f"docs, more than the {target_fp} the false-positive rate asks for; kept them all")
    flag[_pick(np.flatnonzero(pool & ~flag), key_fp, target_fp - natural_fp)] = True

    labels = np.where(flag, FORGET_LABEL, UNLABELED).astype(np.uint8)
    retain_candidates = np.flatnonzero((truth == RETAIN) & ~flag)
    n_retain_mode = int(round(policy.retain_mode_share * len(retain_candidates)))
    labels[_pick(retain_candidates, key_retain, n_retain_mode)] = RETAIN_LABEL

    missed = forget & ~flag
    fp = pool & flag
    rm_base = (truth == RETAIN) & ~flag
    rm = labels == RETAIN_LABEL
    non_forget = ~forget
    report = {
        "undiscovered_rate": _rate(missed.sum(), n_forget),
        "undiscovered_rate_tokens": _rate(lengths[missed].sum(), lengths[forget].sum()),
        "false_positive_rate": _rate(fp.sum(), n_pool),
        "false_positive_rate_tokens": _rate(lengths[fp].sum(), lengths[pool].sum()),
        "false_positive_pool": ("retain", "forget", "adjacent")[pool_domain],
        "false_positive_rate_all_nonforget": _rate((flag & non_forget).sum(), non_forget.sum()),
        "retain_mode_share": _rate(rm.sum(), rm_base.sum()),
        "retain_mode_share_tokens": _rate(lengths[rm].sum(), lengths[rm_base].sum()),
        "classifier_undiscovered": _rate(natural_missed, n_forget),
        "classifier_false_positive_rate": _rate(natural_fp, n_pool),
        "docs": {"forget_missed": int(missed.sum()), "forget_total": n_forget,
                 "false_positives": int(fp.sum()), "pool_total": n_pool,
                 "retain_mode": int(rm.sum()), "retain_mode_base": int(rm_base.sum())},
        "notes": notes,
    }
    return LabelResult(labels, report)
