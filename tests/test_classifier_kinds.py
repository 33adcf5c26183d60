"""Each classifier kind's scoring rule on hand-made texts: keyword matching and weights, the
score contract, Hugging Face windows and their aggregation, and cascade routing."""
from __future__ import annotations

import numpy as np
import pytest

import prep_entry_points
from data_prep import PrepError
from data_prep.classifiers import checked_scores, make_scorer, stage_counts
from data_prep.classifiers.keywords import KeywordScorer
from data_prep.recipe import ClassifierConfig
from prep_classifiers import tiny_hf
from prep_corpus import wiki_leads


def _keywords(tmp_path, text: str, **cfg) -> KeywordScorer:
    path = tmp_path / "list.txt"
    path.write_text(text, encoding="utf-8")
    return KeywordScorer(ClassifierConfig(kind="keywords", keywords=str(path), **cfg))


def test_terms_match_whole_words_in_sequence(tmp_path):
    k = _keywords(tmp_path, "# a comment\n\ncat\ne-coli\nspore   print\n")
    assert k.hits("cat category Cat. CATS cat") == 3  # not "category", not "cats"
    assert k.hits("E. coli and e coli, not ecoli") == 2
    assert k.hits("a spore print; spore-print; spore, print; spores print") == 3
    assert _keywords(tmp_path, "Cat\n", case_fold=False).hits("Cat cat CAT") == 1


def test_regexes_weights_and_distinct_terms(tmp_path):
    text = "Anthrax spores. anthrax again; toxin and TOXINS and toxin."
    k = _keywords(tmp_path, "anthrax\t2\nre:toxins?\t0.5\n")
    assert k.hits(text) == 2 * 2 + 0.5 * 3
    assert _keywords(tmp_path, "anthrax\t2\nre:toxins?\t0.5\n", distinct_terms=True).hits(text) == 2.5
    assert _keywords(tmp_path, "re:toxins?\n", case_fold=False).hits(text) == 2


def test_keyword_score_reaches_one_half_at_min_hits(tmp_path):
    k = _keywords(tmp_path, "de\n", min_hits=3)
    texts = ["", "de", "de de", "de de de", "de " * 9]
    s = k.score(texts)
    assert s == pytest.approx([0, 1 / 4, 2 / 5, 3 / 6, 9 / 12])
    assert list(s >= 0.5) == [False, False, False, True, True]


def test_keyword_list_rejects_repeated_entries(tmp_path):
    with pytest.raises(PrepError, match=r"list.txt:3: repeats the entry of line 1"):
        _keywords(tmp_path, "Spore\nother\nspore\n")


@pytest.mark.parametrize("raw, problem", [
    (np.zeros((3, 1)), r"returned shape \(3, 1\) for a batch of 3"),
    (0.5, r"returned shape \(\) for a batch of 3"),
    ([0.1, float("inf"), 0.2], r"returned inf for text 1 of a batch of 3"),
    ([0.1, 0.2, 1.0000001], r"returned 1.0000001 for text 2"),
    ([None, 0.1, 0.2], r"returned nan for text 0"),
])
def test_score_contract(raw, problem):
    with pytest.raises(PrepError, match=problem):
        checked_scores(raw, 3, "f")


def test_score_contract_accepts_sequences_of_numbers():
    for raw in ([0, 1, 0.5], (0.0, 1.0, 0.25), np.array([0.2, 0.3, 1.0], np.float16)):
        out = checked_scores(raw, 3, "f")
        assert out.dtype == np.float32 and out.shape == (3,)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf(tmp_path_factory.mktemp("hf"), wiki_leads("en", 60) + wiki_leads("es", 40))


def _hf(hf_dir, **cfg):
    return make_scorer(ClassifierConfig(kind="hf", model=str(hf_dir), forget_label="forget", **cfg), None)


def test_hf_windows_and_their_aggregation(hf_dir):
    texts = wiki_leads("en", 3, skip=300) + ["", "short"]
    s = _hf(hf_dir, max_length=16)
    ids, owner = s.windows(texts)
    counts = np.bincount(owner, minlength=len(texts))
    assert all(len(w) <= 16 for w in ids) and counts[:3].min() > 2 and list(counts[3:]) == [1, 1]
    # Windows tile the text: their tokens, special tokens removed, are the whole text's tokens.
    whole = s.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    special = set(s.tokenizer.all_special_ids)
    assert [t for w, o in zip(ids, owner) if o == 0 for t in w if t not in special] == whole
    per_window = s.window_scores(ids)
    for agg, reduce in (("max", np.max), ("mean", np.mean)):
        got = _hf(hf_dir, max_length=16, window_aggregation=agg).score(texts)
        want = [reduce(per_window[owner == i]) for i in range(len(texts))]
        assert got == pytest.approx(want, abs=1e-6)
    # max_windows keeps the first windows of each text.
    capped = _hf(hf_dir, max_length=16, max_windows=2, window_aggregation="mean").score(texts)
    want = [per_window[np.flatnonzero(owner == i)[:2]].mean() for i in range(len(texts))]
    assert capped == pytest.approx(want, abs=1e-6)


def test_hf_batches_and_dtypes_give_the_same_scores(hf_dir):
    texts = wiki_leads("en", 6, skip=100) + wiki_leads("es", 6, skip=100)
    one = _hf(hf_dir, max_length=40, batch_size=1)
    ids, _ = one.windows(texts)
    assert len({len(w) for w in ids}) > 5  # short last windows: batches of 7 pad most of them
    ref = one.window_scores(ids)
    # Per window, padded or not: the attention mask hides the padding (float rounding only).
    assert _hf(hf_dir, max_length=40, batch_size=7).window_scores(ids) == pytest.approx(ref, abs=2e-6)
    assert _hf(hf_dir, max_length=40, batch_size=7, window_aggregation="mean").score(texts) == pytest.approx(
        _hf(hf_dir, max_length=40, batch_size=1, window_aggregation="mean").score(texts), abs=2e-6)
    assert _hf(hf_dir, max_length=40, dtype="bfloat16").window_scores(ids) == pytest.approx(ref, abs=2e-2)


def _cascade(tmp_path, decides: str, threshold: float):
    (tmp_path / "k.txt").write_text("de\nla\nel\nen\n", encoding="utf-8")
    cfg = ClassifierConfig(kind="cascade", threshold=0.5, stages=[
        ClassifierConfig(kind="keywords", keywords=str(tmp_path / "k.txt"), min_hits=4, decides=decides,
                         threshold=threshold),
        ClassifierConfig(kind="python", entry_point="prep_entry_points:recording")])
    return cfg, make_scorer(cfg, None)


@pytest.mark.parametrize("decides, threshold", [("retain", 0.5), ("forget", 0.5), ("retain", 0.3)])
def test_cascade_stages_see_only_what_passes(tmp_path, decides, threshold):
    texts = wiki_leads("en", 8, skip=50) + wiki_leads("es", 8, skip=50) + ["de la el en de"]
    cfg, cascade = _cascade(tmp_path, decides, threshold)
    first = make_scorer(cfg.stages[0], None).score(texts)
    prep_entry_points.SEEN.clear()
    trace = cascade.trace(texts)
    passes = first >= threshold if decides == "retain" else first < threshold
    assert prep_entry_points.SEEN == [t for t, p in zip(texts, passes) if p]
    second = prep_entry_points.spanish(texts)
    assert trace.scores == pytest.approx(np.where(passes, second, first))
    assert list(trace.stage) == [1 if p else 0 for p in passes]
    assert np.isnan(trace.stage_scores[~passes, 1]).all() and not np.isnan(trace.stage_scores[:, 0]).any()
    truth = np.array([0] * 8 + [1] * 9, np.uint8)
    counts = stage_counts(trace, truth, cfg.stages)
    assert [c["seen"] for c in counts] == [len(texts), int(passes.sum())]
    assert [c["decided"] for c in counts] == [int((~passes).sum()), int(passes.sum())]
    assert sum(counts[0][k] for k in ("true_positives", "false_positives", "false_negatives",
                                      "true_negatives")) == len(texts)
