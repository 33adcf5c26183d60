"""Forget-score classifiers and their measured quality against ground truth.

Every document gets a float forget-score in [0, 1]; labels come later from a
threshold (see :mod:`data_prep.noise`), so thresholds and noise can change without
re-tokenizing. The errors measured here are the classifier's own, never injected.
"""
from __future__ import annotations

import numpy as np

from data_prep.corpus import FORGET
from data_prep.recipe import ClassifierConfig


class LanguageScorer:
    """py3langid restricted to the recipe's languages; score = P(forget language)."""

    def __init__(self, cfg: ClassifierConfig):
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

        self._id = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)
        self._id.set_languages(list(cfg.languages))
        self._target = cfg.forget_language
        self._max_chars = cfg.max_chars

    def score(self, texts: list[str]) -> np.ndarray:
        out = np.empty(len(texts), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = dict(self._id.rank(t[: self._max_chars])).get(self._target, 0.0)
        return np.clip(out, 0.0, 1.0)


class TopicScorer:
    """TF-IDF + logistic regression fit on a labelled seed split of the train documents."""

    def __init__(self, cfg: ClassifierConfig):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self._vec = TfidfVectorizer(sublinear_tf=True, min_df=2, max_features=50000)
        # Balanced weights: the forget topic is a minority class (~14% of English leads).
        self._clf = LogisticRegression(C=10.0, class_weight="balanced", max_iter=1000)

    def fit(self, texts: list[str], is_forget: np.ndarray) -> "TopicScorer":
        if is_forget.all() or not is_forget.any():
            from data_prep.errors import PrepError

            raise PrepError("topic classifier: the seed split needs both forget and non-forget documents")
        self._clf.fit(self._vec.fit_transform(texts), is_forget)
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        return self._clf.predict_proba(self._vec.transform(texts))[:, 1].astype(np.float32)


def seed_mask(n: int, cfg: ClassifierConfig) -> np.ndarray:
    """Which train documents form the classifier's labelled seed split."""
    rng = np.random.default_rng([cfg.seed, 7])
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: max(1, int(round(cfg.seed_fraction * n)))]] = True
    return mask


def oracle_scores(truth: np.ndarray) -> np.ndarray:
    return (truth == FORGET).astype(np.float32)


def measure(scores: np.ndarray, truth: np.ndarray, threshold: float, evaluate: np.ndarray) -> dict:
    """Precision / recall / F1 of the thresholded classifier on the ``evaluate`` docs."""
    flag = scores[evaluate] >= threshold
    pos = truth[evaluate] == FORGET
    tp = int((flag & pos).sum())
    fp = int((flag & ~pos).sum())
    fn = int((~flag & pos).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 6), "recall": round(recall, 6), "f1": round(f1, 6),
            "true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "evaluated_docs": int(evaluate.sum()), "threshold": threshold}
