"""Forget-score classifiers and their measured quality against ground truth.

Every document gets a float forget-score in [0, 1]; labels come later from a
threshold (see :mod:`data_prep.noise`), so thresholds and noise can change without
re-tokenizing. The errors measured here are the classifier's own, never injected.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from data_prep.documents import FORGET
from data_prep.errors import PrepError
from data_prep.recipe import ClassifierConfig

TOPIC_FILE = "topic_classifier.json"


_IDENTIFIERS: dict = {}


def _identifier(languages: tuple[str, ...]):
    """py3langid's model, restricted; cached per process because unpacking it (LZMA)
    costs more CPU than scoring the whole embedded corpus."""
    if languages not in _IDENTIFIERS:
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

        ident = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)
        ident.set_languages(list(languages))
        _IDENTIFIERS[languages] = ident
    return _IDENTIFIERS[languages]


class LanguageScorer:
    """py3langid restricted to the recipe's languages; score = P(forget language).

    Uses py3langid's own model and scoring rule, but walks its byte DFA for a whole
    batch at once with numpy (one vector step per byte position) instead of one
    Python step per byte per document: the same scores to float rounding (checked against
    py3langid itself), several times faster.
    """

    def __init__(self, cfg: ClassifierConfig):
        ident = _identifier(tuple(cfg.languages))
        self.identifier = ident  # the reference implementation, kept for cross-checks
        # A view, not a copy: the transition table has ~10M entries.
        self._nm = np.frombuffer(ident.tk_nextmove, dtype=np.dtype(ident.tk_nextmove.typecode))
        self._rowbase = np.asarray(ident._rowbase, dtype=np.int64)
        self._out = np.asarray(ident.tk_output, dtype=np.int64)
        self._ptc = np.asarray(ident.nb_ptc, dtype=np.float32)
        self._pc = np.asarray(ident.nb_pc, dtype=np.float32)
        self._aliases = list(ident._alias_pairs)
        self._encode = ident._encode
        self._target = list(ident.nb_classes).index(cfg.forget_language)
        self._max_chars = cfg.max_chars

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Normalised class probabilities, one row per text (py3langid's norm_probs)."""
        enc = [self._encode(t[: self._max_chars]) for t in texts]
        n, k = len(enc), len(self._pc)
        lens = np.fromiter((len(b) for b in enc), dtype=np.int64, count=n)
        order = np.argsort(-lens, kind="stable")  # longest first: active docs are a prefix
        lens_sorted = lens[order]
        width = int(lens_sorted[0]) if n else 0
        # uint8: the bytes themselves (8x less memory than int64 for the same chunk).
        grid = np.zeros((n, width), dtype=np.uint8)
        grid[np.arange(width)[None, :] < lens_sorted[:, None]] = np.frombuffer(
            b"".join(enc[i] for i in order), dtype=np.uint8)
        state = np.zeros(n, dtype=np.int64)
        # Per byte position: the output feature (or -1) of every still-active document.
        # Filtering and pairing with document ids happen once at the end, not per position.
        outputs, actives = [], []
        active = n
        for t in range(width):
            while active and lens_sorted[active - 1] <= t:
                active -= 1
            s = self._nm[self._rowbase[state[:active]] + grid[:active, t]]
            state[:active] = s
            outputs.append(self._out[s])
            actives.append(active)
        scores = np.zeros((n, k), dtype=np.float32)
        f = np.concatenate(outputs) if outputs else np.zeros(0, np.int64)
        d = np.concatenate([np.arange(a) for a in actives]) if outputs else np.zeros(0, np.int64)
        d, f = d[f >= 0], f[f >= 0]
        if len(d):
            nfeat = len(self._ptc)
            # Sorted (document, feature) pairs with their counts; documents come in runs.
            pairs, counts = np.unique(d * nfeat + f, return_counts=True)
            d, f = pairs // nfeat, pairs % nfeat
            contrib = np.log1p(counts.astype(np.float32))[:, None] * self._ptc[f]
            starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
            scores[d[starts]] = np.add.reduceat(contrib, starts, axis=0)
            scores[d[starts]] += self._pc
        # Same normalisation as py3langid: temperature sqrt(bytes), then softmax.
        scores *= (1.0 / np.sqrt(np.maximum(lens_sorted, 1)))[:, None].astype(np.float32)
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        for i, j in self._aliases:
            scores[:, i] += scores[:, j]
            scores[:, j] = 0.0
        out = np.empty_like(scores)
        out[order] = scores
        return out

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return np.clip(self.probabilities(texts)[:, self._target], 0.0, 1.0).astype(np.float32)


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
            raise PrepError("topic classifier: the seed split needs both forget and non-forget documents")
        self._clf.fit(self._vec.fit_transform(texts), is_forget)
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        return self._clf.predict_proba(self._vec.transform(texts))[:, 1].astype(np.float32)

    def save(self, directory: Path) -> str:
        """The fitted vocabulary, idf weights and coefficients as JSON (no pickle; floats
        round-trip exactly), so every map task, on any machine, scores with these numbers."""
        vocab = sorted(self._vec.vocabulary_.items(), key=lambda kv: kv[1])
        data = {"terms": [t for t, _ in vocab], "idf": self._vec.idf_.tolist(),
                "coef": self._clf.coef_.tolist(), "intercept": self._clf.intercept_.tolist(),
                "classes": self._clf.classes_.tolist()}
        (Path(directory) / TOPIC_FILE).write_text(json.dumps(data), encoding="utf-8")
        return TOPIC_FILE

    @classmethod
    def load(cls, directory: Path, cfg: ClassifierConfig) -> "TopicScorer":
        try:
            data = json.loads((Path(directory) / TOPIC_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PrepError(f"{directory}: topic classifier unreadable ({e}); rerun with --force") from None
        self = cls(cfg)
        self._vec.set_params(vocabulary={t: i for i, t in enumerate(data["terms"])})
        self._vec.fit(["x"])  # builds the fixed-vocabulary analyzer; idf is replaced next
        self._vec.idf_ = np.asarray(data["idf"], np.float64)
        self._clf.coef_ = np.asarray(data["coef"], np.float64)
        self._clf.intercept_ = np.asarray(data["intercept"], np.float64)
        self._clf.classes_ = np.asarray(data["classes"])
        return self


def make_scorer(cfg: ClassifierConfig, state_dir: Path) -> Optional[Callable[[list[str]], np.ndarray]]:
    """The per-text forget scorer of a map task; None for the oracle (scores from truth)."""
    if cfg.kind == "language":
        return LanguageScorer(cfg).score
    if cfg.kind == "topic":
        return TopicScorer.load(state_dir, cfg).score
    return None


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
