"""Classifiers users bring, built or trained inside the tests and run through `sgtm prep` on
the embedded corpus: fastText, a tiny Hugging Face model, a keyword list, a python entry point
and a two-stage cascade; their quality against the recipe's truth, per stage for the cascade,
at document and paragraph granularity; model files as inputs of the prep; one load per worker."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from prep_classifiers import cascade_args, fasttext_args, keyword_args, tiny_hf, train_fasttext
from prep_corpus import RECIPE_OVERRIDES, wiki_leads, write_corpus

ROOT = Path(__file__).resolve().parents[1]
PARAGRAPH_RECIPE = ROOT / "configs/data/bilingual_paragraph.yaml"
PARAGRAPH_SMALL = ["sources.0.max_docs=300", "split.max_test_docs=20", "tokenizer.kind=bpe",
                   "tokenizer.vocab_size=600", "tokenizer.max_train_bytes=150000"]
PYTHON_ARGS = ["classifier.kind=python", "classifier.entry_point=prep_entry_points:spanish"]
TOPIC_CASCADE = ROOT / "configs/data/topic_cascade.yaml"
TOPIC_SMALL = ["max_docs=2500", "split.max_test_docs=60", "tokenizer.kind=bpe", "tokenizer.vocab_size=800",
               "tokenizer.max_train_bytes=250000"]


def _prep(recipe, out: Path, *args: str, overrides=RECIPE_OVERRIDES) -> dict:
    assert main(["--recipe", str(recipe), "--out", str(out), "--no-progress", "--workers", "2",
                 *overrides, *args]) == 0
    return json.loads((out / "manifest.json").read_text())


def _scores(out: Path, m: dict, kind: str = "scores") -> np.ndarray:
    return np.concatenate([np.load(out / f"{s['prefix']}_{kind}.npy") for s in m["splits"]["train"]["shards"]])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def fasttext_model(corpus):
    root, recipe = corpus
    return train_fasttext(recipe, root / "fasttext.bin", RECIPE_OVERRIDES)


@pytest.fixture(scope="module")
def hf_model(corpus):
    root, _ = corpus
    return tiny_hf(root / "hf", wiki_leads("en", 200) + wiki_leads("es", 100))


def _above_chance(clf: dict, m: dict, floor: float) -> None:
    """Precision above the forget share (what flagging at random gives) and recall above
    ``floor``; the same on the held-out documents, which nothing in prep was fit on."""
    forget_share = m["splits"]["train"]["docs_per_true_domain"]["forget"] / m["splits"]["train"]["num_docs"]
    for where in (clf, clf["heldout"]):
        assert where["precision"] > max(floor, forget_share + 0.3), where
        assert where["recall"] > floor, where


def test_fasttext_model_trained_on_the_corpus(corpus, fasttext_model, tmp_path):
    import fasttext

    _, recipe = corpus
    m = _prep(recipe, tmp_path / "out", *fasttext_args(fasttext_model))
    clf = m["classifier"]
    print(f"fasttext: precision {clf['precision']} recall {clf['recall']}; held out {clf['heldout']}")
    assert clf["kind"] == "fasttext" and clf["evaluated_docs"] == m["splits"]["train"]["num_docs"]
    _above_chance(clf, m, 0.9)
    # The model file is part of the corpus record: its size and sha256.
    rec = clf["files"][str(fasttext_model)]
    assert rec["bytes"] == fasttext_model.stat().st_size and len(rec["sha256"]) == 64
    # The score is the model's probability of the forget label, whatever its rank.
    from data_prep.classifiers import make_scorer
    from data_prep.recipe import load_recipe

    cfg = load_recipe(recipe, fasttext_args(fasttext_model)).classifier
    texts = wiki_leads("en", 3, skip=500) + wiki_leads("es", 3, skip=500)
    model = fasttext.load_model(str(fasttext_model))
    expect = [dict(zip(*model.predict(t.replace("\n", " "), k=-1)))["__label__forget"] for t in texts]
    assert make_scorer(cfg, tmp_path).score(texts) == pytest.approx(expect, abs=1e-6)


def test_keyword_list(corpus, tmp_path):
    _, recipe = corpus
    m = _prep(recipe, tmp_path / "out", *keyword_args())
    clf = m["classifier"]
    print(f"keywords: precision {clf['precision']} recall {clf['recall']}; held out {clf['heldout']}")
    _above_chance(clf, m, 0.85)
    # hits / (hits + min_hits): exactly the documents with at least min_hits hits score 0.5 or more.
    s = _scores(tmp_path / "out", m)
    assert ((s >= 0.5) == (s / (1 - s + 1e-12) * 5 >= 5 - 1e-4)).all() and (s == 0).any()


def test_python_entry_point(corpus, tmp_path):
    _, recipe = corpus
    m = _prep(recipe, tmp_path / "out", *PYTHON_ARGS)
    clf = m["classifier"]
    print(f"python: precision {clf['precision']} recall {clf['recall']}; held out {clf['heldout']}")
    _above_chance(clf, m, 0.85)
    assert set(clf["files"]) == {str(ROOT / "tests/prep_entry_points.py")}


def test_hf_classifier_through_its_loading_and_batching_path(corpus, hf_model, tmp_path):
    _, recipe = corpus
    # Windows of 64 tokens: most leads are several windows; batches of 32 windows.
    args = ["classifier.kind=hf", f"classifier.model={hf_model}", "classifier.forget_label=forget",
            "classifier.max_length=64", "classifier.batch_size=32"]
    m = _prep(recipe, tmp_path / "forked", *args)  # two forked workers share the loaded model
    assert m["classifier"]["kind"] == "hf" and m["classifier"]["evaluated_docs"] == m["splits"]["train"]["num_docs"]
    assert "config.json" in {Path(p).name for p in m["classifier"]["files"]}
    s = _scores(tmp_path / "forked", m)
    assert ((s >= 0) & (s <= 1)).all() and s.std() > 0
    # One process, other batches: the same scores (to float rounding; padding is masked).
    m1 = _prep(recipe, tmp_path / "single", *args, "classifier.batch_size=13", "--workers", "1")
    assert _scores(tmp_path / "single", m1) == pytest.approx(s, abs=1e-5)


def test_two_stage_cascade(corpus, fasttext_model, tmp_path):
    _, recipe = corpus
    out = tmp_path / "out"
    m = _prep(recipe, out, *cascade_args(fasttext_model))
    clf, n = m["classifier"], m["splits"]["train"]["num_docs"]
    keywords, model = (row["document"] for row in clf["stages"])
    print(f"cascade: precision {clf['precision']} recall {clf['recall']}; stages {clf['stages']}")
    _above_chance(clf, m, 0.85)
    # Every train document enters stage 0; the model sees exactly what the list passed.
    assert keywords["seen"] == n and keywords["decided"] + keywords["passed"] == n
    assert model["seen"] == keywords["passed"] == model["decided"] and model["passed"] == 0
    assert 0 < keywords["decided"] < n
    assert [r["decides"] for r in clf["stages"]] == ["retain", "all"]
    for row in (keywords, model):
        tp, fp, fn, tn = (row[k] for k in ("true_positives", "false_positives", "false_negatives", "true_negatives"))
        assert tp + fp + fn + tn == row["seen"] and row["precision"] == pytest.approx(tp / (tp + fp), abs=1e-6)
    # Documents the list decided are retain-decided: their score is below the cascade's threshold.
    s = _scores(out, m)
    assert (s < 0.5).sum() >= keywords["decided"]
    # Relabel keeps the stage report (the classifier did not change).
    from data_prep.relabel import relabel

    assert relabel(out, undiscovered_rate=0.3)["classifier"]["stages"] == clf["stages"]


def test_changed_model_is_refused_without_force(corpus, fasttext_model, tmp_path, capsys):
    _, recipe = corpus
    model = shutil.copyfile(fasttext_model, tmp_path / "model.bin")
    first = _prep(recipe, tmp_path / "out", *fasttext_args(model))
    train_fasttext(recipe, model, RECIPE_OVERRIDES, epoch=3)  # another model, same path
    capsys.readouterr()
    assert main(["--recipe", str(recipe), "--out", str(tmp_path / "out"), "--no-progress",
                 *RECIPE_OVERRIDES, *fasttext_args(model)]) == 2
    assert "input files changed since it was made" in capsys.readouterr().err
    again = _prep(recipe, tmp_path / "out", *fasttext_args(model), "--force")
    sha = lambda m: m["classifier"]["files"][str(model)]["sha256"]  # noqa: E731
    assert sha(again) != sha(first) and again["corpus_fingerprint"] != first["corpus_fingerprint"]


def test_classifier_loads_once_per_worker(corpus, fasttext_model, tmp_path, monkeypatch):
    from data_prep.classifiers import fasttext_model as ft

    log = tmp_path / "loads.txt"
    real_init = ft.FastTextScorer.__init__

    def counted(self, *a, **kw):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        real_init(self, *a, **kw)

    monkeypatch.setattr(ft.FastTextScorer, "__init__", counted)
    _, recipe = corpus
    model = shutil.copyfile(fasttext_model, tmp_path / "model.bin")
    m = _prep(recipe, tmp_path / "out", *fasttext_args(model))  # 6 shards, 2 forked workers
    assert len(m["splits"]["train"]["shards"]) == 6
    assert log.read_text().split() == [str(os.getpid())]
    # The same process, another run: still loaded; a model file touched since: loaded afresh.
    _prep(recipe, tmp_path / "out", *fasttext_args(model), "--force", "--workers", "1")
    assert len(log.read_text().split()) == 1
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    _prep(recipe, tmp_path / "out", *fasttext_args(model), "--force")
    assert len(log.read_text().split()) == 2


@pytest.fixture(scope="module")
def paragraph_model(tmp_path_factory):
    """fastText trained on the mixed corpus's paragraphs (one line per paragraph truth)."""
    root = tmp_path_factory.mktemp("para")
    return train_fasttext(PARAGRAPH_RECIPE, root / "fasttext.bin", PARAGRAPH_SMALL)


@pytest.mark.parametrize("kind", ["fasttext", "keywords", "python", "cascade", "hf"])
def test_every_kind_at_paragraph_granularity(kind, paragraph_model, tmp_path, request):
    args = {"fasttext": fasttext_args(paragraph_model), "keywords": keyword_args(min_hits=3),
            "python": PYTHON_ARGS, "cascade": cascade_args(paragraph_model)[:1] + [
                cascade_args(paragraph_model)[1].replace("min_hits: 5", "min_hits: 3")]}
    if kind == "hf":
        args["hf"] = ["classifier.kind=hf", f"classifier.model={request.getfixturevalue('hf_model')}",
                      "classifier.forget_label=forget", "classifier.max_length=64"]
    out = tmp_path / "out"
    m = _prep(PARAGRAPH_RECIPE, out, *args[kind], overrides=PARAGRAPH_SMALL)
    g = m["classifier"]["by_granularity"]
    spans = _scores(out, m, "span_scores")
    assert len(spans) == m["splits"]["train"]["num_spans"] and ((spans >= 0) & (spans <= 1)).all()
    if kind == "hf":  # random weights: the path runs, the quality means nothing
        assert spans.std() > 0
        return
    tok = g["tokens"]
    print(f"{kind}: paragraph labels {tok['paragraph_labels']}, document labels {tok['document_labels']}")
    # Mixed documents: per-paragraph scores recover the truth better than one per document.
    assert g["paragraph"]["precision"] > 0.85 and g["paragraph"]["recall"] > 0.8
    assert tok["paragraph_labels"]["f1"] > tok["document_labels"]["f1"] + 0.1
    if kind == "cascade":
        for level in ("document", "paragraph"):
            first, second = (row[level] for row in m["classifier"]["stages"])
            assert first["seen"] == first["decided"] + first["passed"] and second["seen"] == first["passed"] > 0
        assert m["classifier"]["stages"][0]["paragraph"]["seen"] <= m["splits"]["train"]["num_spans"]


def test_worked_deep_ignorance_style_recipe(tmp_path):
    """configs/data/topic_cascade.yaml as data_prep/README.md runs it (on a subset): train the
    fastText stage with the bundled trainer, then the blocklist -> model cascade."""
    from data_prep.recipe import load_recipe

    assert load_recipe(TOPIC_CASCADE).classifier.stages[1].model == "runs/classifiers/biology_fasttext.bin"
    model = train_fasttext(TOPIC_CASCADE, tmp_path / "biology.bin", TOPIC_SMALL)
    m = _prep(TOPIC_CASCADE, tmp_path / "out", f"classifier.stages.1.model={model}", overrides=TOPIC_SMALL)
    clf, n = m["classifier"], m["splits"]["train"]["num_docs"]
    blocklist, fasttext = (row["document"] for row in clf["stages"])
    print(f"topic cascade: precision {clf['precision']} recall {clf['recall']}; held out {clf['heldout']}; "
          f"blocklist {blocklist}; fastText {fasttext}")
    # The blocklist lets most leads go as retain; the model decides the flagged rest, more precisely.
    assert blocklist["seen"] == n and blocklist["decided"] > n / 2 and fasttext["seen"] == blocklist["passed"]
    assert fasttext["precision"] > blocklist["precision"]
    # Above chance: precision well above the forget share (random flags), recall well above the
    # share of documents the cascade flags (what flagging as many at random would recall).
    forget_share = m["splits"]["train"]["docs_per_true_domain"]["forget"] / n
    flagged = (clf["true_positives"] + clf["false_positives"]) / n
    assert clf["precision"] > forget_share + 0.5 and clf["recall"] > flagged + 0.3
    assert clf["heldout"]["precision"] > forget_share + 0.3 and clf["heldout"]["recall"] > flagged + 0.1
