"""Label-homogeneous packing: pure index math, no shards needed."""
import numpy as np
import pytest

from megatron_sgtm.data.packing import build_packing, cached_packing


def _corpus(n=300, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 90, size=n)
    labels = rng.choice(3, size=n, p=[0.6, 0.15, 0.25])
    truth = np.where(labels == 2, 1, rng.choice([0, 2], size=n, p=[0.8, 0.2]))
    return lengths, labels, truth


def _stream_tokens(index, s):
    return [(d, t) for d, a, b in index.pieces(s) for t in range(a, b)]


def test_samples_are_homogeneous_full_length_and_cover_each_label_stream():
    lengths, labels, truth = _corpus()
    seq = 31
    idx = build_packing(lengths, labels, seq, seed=3, doc_truth=truth)
    assert idx.num_samples > 0
    for s in range(idx.num_samples):
        pieces = idx.pieces(s)
        assert sum(b - a for _, a, b in pieces) == seq + 1
        assert {int(labels[d]) for d, _, _ in pieces} == {int(idx.sample_label[s])}
        assert all(0 <= a < b <= lengths[d] for d, a, b in pieces)
    for label in range(3):
        mine = np.flatnonzero(idx.sample_label == label)
        total = int(lengths[labels == label].sum())
        # Everything but a tail shorter than one sample is used, each token exactly once.
        assert len(mine) == total // (seq + 1)
        toks = [t for s in mine for t in _stream_tokens(idx, s)]
        assert len(set(toks)) == len(toks) == len(mine) * (seq + 1)
    np.testing.assert_array_equal(idx.routing_label, idx.sample_label)


def test_majority_truth_counts_tokens():
    lengths = np.array([10, 3, 20])
    labels = np.zeros(3, np.int64)
    truth = np.array([1, 2, 0])
    idx = build_packing(lengths, labels, 32, seed=0, doc_truth=truth)
    assert idx.num_samples == 1
    assert idx.sample_truth[0] == 0  # 20 retain tokens outweigh 10 forget + 3 adjacent


def test_deterministic_from_seed_and_seed_changes_order():
    lengths, labels, truth = _corpus()
    a = build_packing(lengths, labels, 15, seed=7, doc_truth=truth)
    b = build_packing(lengths, labels, 15, seed=7, doc_truth=truth)
    c = build_packing(lengths, labels, 15, seed=8, doc_truth=truth)
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(v, b.arrays()[k])
    assert not np.array_equal(a.piece_doc, c.piece_doc)


def test_filters_drop_documents_and_zero_routing():
    lengths, labels, truth = _corpus()
    weak = build_packing(lengths, labels, 15, 0, truth, drop_labels=(2,), route=False)
    strict = build_packing(lengths, labels, 15, 0, truth, drop_labels=(2,), drop_truth=(2,),
                           route=False)
    assert weak.dropped_docs == int((labels == 2).sum())
    assert strict.dropped_docs == int(((labels == 2) | (truth == 2)).sum())
    assert not np.isin(weak.piece_doc, np.flatnonzero(labels == 2)).any()
    assert not np.isin(strict.piece_doc, np.flatnonzero((labels == 2) | (truth == 2))).any()
    assert (weak.routing_label == 0).all() and (strict.routing_label == 0).all()
    assert strict.num_samples < weak.num_samples


def test_too_little_data_gives_empty_index_and_bad_input_raises():
    idx = build_packing(np.array([3, 4]), np.array([0, 1]), 10, seed=0)
    assert idx.num_samples == 0 and idx.piece_ptr.tolist() == [0]
    with pytest.raises(ValueError, match="differ in length"):
        build_packing(np.array([3, 4]), np.array([0]), 10, seed=0)


def test_cache_roundtrip_and_key(tmp_path):
    lengths, labels, truth = _corpus()
    a, key_a = cached_packing(tmp_path, lengths, labels, truth, 15, 1)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"packing_{key_a}"]  # no temp entry left
    b, key_b = cached_packing(tmp_path, lengths, labels, truth, 15, 1)
    assert key_a == key_b
    # Read back as memory maps: a restart reads the entries its steps use, not the index.
    assert all(isinstance(v, np.memmap) for v in b.arrays().values())
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(v, b.arrays()[k])
    relabelled = labels.copy()
    relabelled[0] = (relabelled[0] + 1) % 3
    _, key_c = cached_packing(tmp_path, lengths, relabelled, truth, 15, 1)
    _, key_d = cached_packing(tmp_path, lengths, labels, truth, 15, 1, drop_labels=(2,))
    assert len({key_a, key_c, key_d}) == 3
    # A corrupt cache entry is rebuilt, not trusted.
    (tmp_path / f"packing_{key_a}" / "piece_doc.npy").write_bytes(b"garbage")
    c, _ = cached_packing(tmp_path, lengths, labels, truth, 15, 1)
    np.testing.assert_array_equal(c.piece_doc, a.piece_doc)
