"""Shard reader: a real shard directory round-trips; every kind of damage is one DataError."""
import json
import shutil

import numpy as np
import pytest

from megatron_sgtm.data import DataError, open_split
from megatron_sgtm.data.testing import sample_documents, write_test_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    texts, truth = sample_documents(40, seed=1, adjacent_share=0.2)
    write_test_shards(d, texts, [2 if t == 1 else 0 for t in truth], truth)
    return d


def _copy(shard_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(shard_dir, dst)
    return dst


def test_roundtrip_tokens_labels_truth(shard_dir):
    split = open_split(shard_dir, "train")
    assert split.num_docs == 40
    assert split.doc_lengths.dtype == np.int64
    truth = np.load(shard_dir / "train_truth.npy")
    np.testing.assert_array_equal(split.doc_truth, truth)
    eod = split.manifest["tokenizer"]["eod_id"]
    for d in range(split.num_docs):
        toks = split.get_tokens(d)
        assert len(toks) == split.doc_lengths[d] and toks[-1] == eod
        assert split.doc_labels[d] == split.get_labels(d).max()
    assert (split.doc_labels[truth == 1] == 2).all()
    assert split.num_tokens == split.manifest["splits"]["train"]["num_tokens"]


def test_mixed_label_document_takes_max(tmp_path):
    write_test_shards(tmp_path, [[5, 6, 7, 1], [8, 9, 1]], [np.array([0, 2, 2, 0]), 1], [1, 0],
                      vocab=16)
    split = open_split(tmp_path, "train")
    assert split.doc_labels.tolist() == [2, 1]
    assert split.mixed_label_docs == 1


def _damage(name, d):
    if name == "no_manifest":
        (d / "manifest.json").unlink()
    elif name == "bad_manifest":
        (d / "manifest.json").write_text("{not json")
    elif name == "truncated_tokens":
        p = d / "train_tokens.bin"
        p.write_bytes(p.read_bytes()[:-6])
    elif name == "missing_labels":
        (d / "train_labels.bin").unlink()
    elif name == "sidecar_lengths":
        write_test_shards(d / "other", [[3, 1], [4, 4, 1]] * 20, [0] * 40, [0] * 40, vocab=16)
        for ext in ("bin", "idx"):
            shutil.copy(d / "other" / f"train_labels.{ext}", d / f"train_labels.{ext}")
    elif name == "sidecar_count":
        write_test_shards(d / "other", [[3, 1]] * 39, [0] * 39, [0] * 39, vocab=16)
        for ext in ("bin", "idx"):
            shutil.copy(d / "other" / f"train_labels.{ext}", d / f"train_labels.{ext}")
    elif name == "vocab":
        m = json.loads((d / "manifest.json").read_text())
        m["tokenizer"]["vocab_size"] = 10
        (d / "manifest.json").write_text(json.dumps(m))
    elif name == "truth_length":
        np.save(d / "train_truth.npy", np.zeros(39, np.uint8))
    elif name == "missing_truth":
        (d / "train_truth.npy").unlink()
    elif name == "scores_length":
        np.save(d / "train_scores.npy", np.zeros(41, np.float32))
    elif name == "bad_label_value":
        p = d / "train_labels.bin"
        raw = bytearray(p.read_bytes())
        raw[5] = 7
        p.write_bytes(bytes(raw))
    elif name == "garbage_index":
        (d / "train_tokens.idx").write_bytes(b"NOTANINDEX" * 5)


@pytest.mark.parametrize("damage, needle", [
    ("no_manifest", "manifest.json: missing"),
    ("bad_manifest", "manifest.json: unreadable"),
    ("truncated_tokens", r"train_tokens.bin: \d+ bytes but the index describes \d+ \(truncated\)"),
    ("missing_labels", "train_labels.bin: missing"),
    ("sidecar_lengths", "train_labels.idx: .* differ in length"),
    ("sidecar_count", "train_labels.idx: 39 entries but .*40 documents"),
    ("vocab", "train_tokens.bin: token id .* vocabulary of 10"),
    ("truth_length", r"train_truth.npy: shape \(39,\)"),
    ("missing_truth", "train_truth.npy: missing"),
    ("scores_length", r"train_scores.npy: shape \(41,\)"),
    ("bad_label_value", "train_labels.bin: label 7"),
    ("garbage_index", "train_tokens.idx: unreadable index"),
])
def test_damage_is_one_clear_error(shard_dir, tmp_path, damage, needle):
    d = _copy(shard_dir, tmp_path)
    _damage(damage, d)
    with pytest.raises(DataError, match=needle):
        open_split(d, "train")
    assert isinstance(DataError("x"), ValueError)


def test_missing_split_names_file(shard_dir):
    with pytest.raises(DataError, match="test_forget_tokens.idx: missing"):
        open_split(shard_dir, "test_forget")
