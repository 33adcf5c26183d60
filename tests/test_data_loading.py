"""Training data: validation of shards, label-homogeneous packing, batches and resume."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from megatron_sgtm.data import DataError, TrainBatches, build_sample_index, open_split
from megatron_sgtm.data.testing import write_test_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("shards"))


def test_reads_back_with_matching_sidecar(shards):
    split = open_split(shards, "train")
    assert len(split) == 96 and split.mixed_label_docs == 0
    assert set(np.unique(split.doc_labels)) == {0, 1, 2}
    doc = split.get_tokens(0)
    assert doc[-1] == 256 and bytes(doc[:-1].astype(np.uint8)).decode("utf-8")


def _copy(shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    return out


def test_truncated_shard_is_refused(shards, tmp_path):
    out = _copy(shards, tmp_path)
    path = out / "train_tokens.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        open_split(out, "train")


def test_mismatched_sidecar_is_refused(shards, tmp_path):
    out = _copy(shards, tmp_path)
    for suffix in (".bin", ".idx"):  # the retain test split's labels under the train name
        shutil.copy(out / f"test_retain_labels{suffix}", out / f"train_labels{suffix}")
    with pytest.raises(DataError, match="label sidecar's documents"):
        open_split(out, "train")


def test_missing_manifest_and_bad_labels(shards, tmp_path):
    out = _copy(shards, tmp_path)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json: missing"):
        open_split(out, "train")
    out2 = tmp_path / "copy2"
    shutil.copytree(shards, out2)
    raw = bytearray((out2 / "train_labels.bin").read_bytes())
    raw[3] = 7
    (out2 / "train_labels.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="label codes"):
        open_split(out2, "train")


def test_packing_is_label_homogeneous_deterministic_and_complete():
    lengths = np.array([5, 9, 3, 12, 7, 4, 8])
    labels = np.array([0, 2, 0, 1, 2, 0, 2])
    keep = np.ones(7, bool)
    a = build_sample_index(lengths, labels, keep, seq_length=4, seed=3)
    b = build_sample_index(lengths, labels, keep, seq_length=4, seed=3)
    assert np.array_equal(a.sample_group, b.sample_group)
    assert np.array_equal(a.sample_start, b.sample_start)
    for s in range(len(a)):
        pieces = a.pieces(s)
        assert sum(stop - start for _, start, stop in pieces) == 5
        assert len({labels[d] for d, _, _ in pieces}) == 1
        assert all(0 <= start < stop <= lengths[d] for d, start, stop in pieces)
    # Every label stream of n tokens yields (n - 1) // 4 samples.
    for label in (0, 1, 2):
        n = lengths[labels == label].sum()
        assert sum(a.sample_label(s) == label for s in range(len(a))) == (n - 1) // 4


def test_filters_drop_forget_documents(shards):
    split = open_split(shards, "train")
    weak = TrainBatches(split, 16, 4, 0, 1, seed=0, method="weak_filter")
    routed = TrainBatches(split, 16, 4, 0, 1, seed=0, method="sgtm")
    assert len(weak) < len(routed)
    for _ in range(6):
        batch = next(weak)
        assert (batch["routing_labels"] == 0).all() and (batch["applied_label"] == 0).all()
    # Only undiscovered Spanish (label 0) survives the weak filter.
    docs = weak.index.group_docs
    kept = np.concatenate(docs)
    assert (split.doc_labels[kept] != 2).all()


def test_routing_labels_homogeneous_per_row(shards):
    batches = TrainBatches(open_split(shards, "train"), 16, 8, 0, 1, seed=1, method="sgtm")
    seen = set()
    for _ in range(10):
        batch = next(batches)
        rows = batch["routing_labels"]
        assert (rows == rows[:, :1]).all()
        seen |= set(rows[:, 0].tolist())
        assert batch["tokens"].shape == batch["targets"].shape == (8, 16)
        assert (batch["tokens"][:, 1:] == batch["targets"][:, :-1]).all()
    assert seen == {0, 1, 2}


def test_dp_slices_equal_accumulated_micro_batches_and_resume(shards):
    split = open_split(shards, "train")
    single = TrainBatches(split, 16, 2, 0, 1, seed=5, method="sgtm")
    ranks = [TrainBatches(split, 16, 2, r, 2, seed=5, method="sgtm") for r in range(2)]
    for _ in range(40):  # crosses an epoch boundary
        a, b = next(single), next(single)
        r0, r1 = next(ranks[0]), next(ranks[1])
        assert (a["tokens"] == r0["tokens"]).all() and (b["tokens"] == r1["tokens"]).all()
    state = single.state_dict()
    expected = next(single)
    resumed = TrainBatches(split, 16, 2, 0, 1, seed=5, method="sgtm")
    resumed.load_state_dict(state)
    again = next(resumed)
    assert all((expected[k] == again[k]).all() for k in expected)


def test_unknown_method(shards):
    with pytest.raises(DataError, match="unknown data method"):
        TrainBatches(open_split(shards, "train"), 16, 2, 0, 1, seed=0, method="filtering")
