"""Noise-policy semantics on synthetic documents, and the batched language scorer."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.noise import FORGET_LABEL, RETAIN_LABEL, UNLABELED, apply_policy
from data_prep.recipe import ClassifierConfig, NoiseConfig


def _corpus(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.choice([0, 1, 2], size=n, p=[0.7, 0.2, 0.1]).astype(np.uint8)
    lengths = rng.integers(20, 400, size=n)
    return truth, lengths


def test_oracle_scores_hit_exact_counts():
    truth, lengths = _corpus()
    scores = (truth == 1).astype(np.float32)
    pol = NoiseConfig(seed=1, undiscovered_rate=0.3, false_positive_rate=0.1, retain_mode_share=0.25)
    r = apply_policy(truth, scores, lengths, 0.5, pol)
    lab = r.labels
    n_forget, n_adj = (truth == 1).sum(), (truth == 2).sum()
    assert ((truth == 1) & (lab != FORGET_LABEL)).sum() == round(0.3 * n_forget)
    assert ((truth == 2) & (lab == FORGET_LABEL)).sum() == round(0.1 * n_adj)
    assert ((truth == 0) & (lab == FORGET_LABEL)).sum() == 0  # adjacent pool exists: retain untouched
    base = (truth == 0) & (lab != FORGET_LABEL)
    assert ((lab == RETAIN_LABEL) & base).sum() == round(0.25 * base.sum())
    assert ((lab == RETAIN_LABEL) & (truth != 0)).sum() == 0  # only true retain goes to the retain path
    assert r.report["false_positive_pool"] == "adjacent"


def test_deterministic_and_nested():
    truth, lengths = _corpus()
    scores = (truth == 1).astype(np.float32)
    a = apply_policy(truth, scores, lengths, 0.5, NoiseConfig(seed=4, undiscovered_rate=0.1))
    b = apply_policy(truth, scores, lengths, 0.5, NoiseConfig(seed=4, undiscovered_rate=0.1))
    c = apply_policy(truth, scores, lengths, 0.5, NoiseConfig(seed=4, undiscovered_rate=0.2))
    d = apply_policy(truth, scores, lengths, 0.5, NoiseConfig(seed=5, undiscovered_rate=0.1))
    assert np.array_equal(a.labels, b.labels) and a.report == b.report
    missed_a = (truth == 1) & (a.labels != FORGET_LABEL)
    missed_c = (truth == 1) & (c.labels != FORGET_LABEL)
    assert (missed_c[missed_a]).all()  # raising the rate only adds misses
    assert not np.array_equal(a.labels, d.labels)


def test_natural_errors_are_kept_and_reported():
    truth, lengths = _corpus()
    rng = np.random.default_rng(9)
    # A noisy classifier: misses ~40% of forget docs, flags ~30% of adjacent and some retain.
    scores = np.where(truth == 1, rng.random(len(truth)) > 0.4,
                      np.where(truth == 2, rng.random(len(truth)) < 0.3, rng.random(len(truth)) < 0.02))
    scores = scores.astype(np.float32)
    pol = NoiseConfig(seed=0, undiscovered_rate=0.1, false_positive_rate=0.05, retain_mode_share=0.1)
    r = apply_policy(truth, scores, lengths, 0.5, pol)
    rep = r.report
    assert rep["undiscovered_rate"] == rep["classifier_undiscovered"] > 0.3
    assert rep["false_positive_rate"] == rep["classifier_false_positive_rate"] > 0.2
    assert len(rep["notes"]) == 2
    # natural false positives outside the pool stay flagged too
    assert ((truth == 0) & (r.labels == FORGET_LABEL)).sum() == ((truth == 0) & (scores >= 0.5)).sum()
    assert set(np.unique(r.labels)) <= {UNLABELED, RETAIN_LABEL, FORGET_LABEL}


def test_bilingual_pool_is_retain_without_adjacent():
    truth = np.array([0] * 100 + [1] * 50, dtype=np.uint8)
    r = apply_policy(truth, (truth == 1).astype(np.float32), np.full(150, 10), 0.5,
                     NoiseConfig(false_positive_rate=0.1, retain_mode_share=0.0))
    assert r.report["false_positive_pool"] == "retain"
    assert ((truth == 0) & (r.labels == FORGET_LABEL)).sum() == 10


def test_batched_langid_matches_py3langid():
    from data_prep.classifiers import LanguageScorer

    texts = ["The cat sat on the mat and looked at the garden.", "El gato se sentó en la alfombra.",
             "", "12345 !!!", "ÁRBOL GRANDE EN EL PARQUE", "Ein Haus am See", "a"] + \
            [("mixed text el perro and the dog " * k)[:300] for k in range(1, 6)]
    scorer = LanguageScorer(ClassifierConfig(languages=["en", "es"], forget_language="es", max_chars=300))
    ref = np.array([dict(scorer.identifier.rank(t[:300]))["es"] for t in texts], dtype=np.float32)
    assert scorer.score(texts) == pytest.approx(ref, abs=1e-5)
