"""The topic classifier: TF-IDF + logistic regression fit on a labelled seed split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.classifiers.base import Scorer
from data_prep.errors import PrepError
from data_prep.recipe import ClassifierConfig

TOPIC_FILE = "topic_classifier.json"


class TopicScorer(Scorer):
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
