"""Training batches from a real shard directory: shapes and labels, DP slicing, exact resume,
epochs, filters, and held-out batches."""
import numpy as np
import pytest
import torch

from megatron_sgtm.data import METHODS, DataError, EvalBatches, TrainBatches, open_split
from megatron_sgtm.data.testing import write_sample_shards

SEQ, MBS = 32, 4


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch_shards")
    write_sample_shards(d, n_train=160, n_test=20, seed=3, adjacent_share=0.2)
    return open_split(d, "train")


def _take(batches, n):
    it = iter(batches)
    return [next(it) for _ in range(n)]


def test_batch_fields_and_label_homogeneity(split):
    tb = TrainBatches(split, SEQ, MBS, 0, 1, seed=0, method="sgtm")
    seen = set()
    for b in _take(tb, 10):
        assert b["tokens"].shape == b["targets"].shape == (MBS, SEQ)
        assert all(b[k].dtype == torch.int64 for k in b)
        assert torch.equal(b["tokens"][:, 1:], b["targets"][:, :-1])
        row = b["routing_labels"][:, :1]
        assert torch.equal(b["routing_labels"], row.expand(-1, SEQ))  # one label per row
        assert torch.equal(b["sample_label"], row[:, 0])
        # Per-token applied labels equal the row's label (documents carry one label here).
        assert torch.equal(b["applied_label"], row.expand(-1, SEQ))
        assert b["true_domain"].shape == (MBS, SEQ) and b["sample_truth"].shape == (MBS,)
        seen |= set(row[:, 0].tolist())
    assert seen == {0, 1, 2}


def test_micro_batches_are_ordered_by_label(split):
    """Forget, then retain-path, then unlabeled sequences: each label one contiguous range,
    as the per-sequence masking path wants; the global sample order decides which samples."""
    tb = TrainBatches(split, SEQ, MBS, 0, 1, seed=0, method="sgtm")
    for step, b in enumerate(_take(tb, 20)):
        labels = b["sample_label"].tolist()
        assert labels == sorted(labels, reverse=True)
        unsorted = tb.global_samples(step * MBS, MBS)
        assert sorted(tb.index.routing_label[unsorted].tolist(), reverse=True) == labels


def test_forget_rows_are_spanish_text(split):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(split.directory / "tokenizer.model"))
    tb = TrainBatches(split, SEQ, MBS, 0, 1, seed=0, method="sgtm")
    words = {2: set(), 0: set()}
    for b in _take(tb, 20):
        for row, lab in zip(b["tokens"].tolist(), b["sample_label"].tolist()):
            if lab in words:
                words[lab] |= set(sp.decode(row).lower().split())
    assert {"el", "la", "de"} <= words[2]
    assert {"the", "and"} <= words[0] and not {"el", "los"} & words[0]


def test_dp_ranks_partition_the_global_batch(split):
    single = _take(TrainBatches(split, SEQ, MBS, 0, 1, seed=1, method="sgtm"), 4)
    ranks = [_take(TrainBatches(split, SEQ, MBS, r, 2, seed=1, method="sgtm"), 2)
             for r in range(2)]
    # DP=1 with micro-steps (0,1),(2,3) sees what DP=2 sees at micro-steps 0 and 1.
    for step in range(2):
        for r in range(2):
            assert torch.equal(ranks[r][step]["tokens"], single[2 * step + r]["tokens"])


def test_resume_from_state_dict_is_exact_and_changed_data_is_refused(split):
    a = TrainBatches(split, SEQ, MBS, 1, 2, seed=2, method="sgtm")
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    want = [next(it)["tokens"] for _ in range(3)]
    b = TrainBatches(split, SEQ, MBS, 1, 2, seed=2, method="sgtm")
    b.load_state_dict(state)
    got = [x["tokens"] for x in _take(b, 3)]
    assert all(torch.equal(x, y) for x, y in zip(want, got))
    other = TrainBatches(split, SEQ, MBS, 1, 2, seed=3, method="sgtm")
    with pytest.raises(DataError, match="different seed"):
        other.load_state_dict(state)


def test_epochs_repeat_with_new_order_and_cover_every_sample(split):
    tb = TrainBatches(split, SEQ, 1, 0, 1, seed=0, method="sgtm")
    n = tb.num_samples
    first, second = tb.global_samples(0, n), tb.global_samples(n, n)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert not np.array_equal(first, second)


def test_filters_drop_documents_and_never_route(split):
    counts = {}
    for method in ("none", "weak_filter", "strict_filter"):
        tb = TrainBatches(split, SEQ, MBS, 0, 1, seed=0, method=method)
        counts[method] = tb.num_samples
        docs = np.unique(tb.index.piece_doc)
        if method != "none":
            assert not (split.doc_labels[docs] == 2).any()
        if method == "strict_filter":
            assert not (split.doc_truth[docs] == 2).any()
        for b in _take(tb, 5):
            assert (b["routing_labels"] == 0).all()
    assert counts["none"] > counts["weak_filter"] > counts["strict_filter"] > 0
    assert set(METHODS) >= {"none", "sgtm", "gradient_routing", "activation_masking",
                            "weak_filter", "strict_filter", "slung", "conditional"}
    with pytest.raises(DataError, match="unknown data method"):
        TrainBatches(split, SEQ, MBS, 0, 1, seed=0, method="nope")


def test_eval_batches_are_contiguous_and_split_over_ranks(split):
    held = open_split(split.directory, "test_forget")
    ev = EvalBatches(held, SEQ, MBS, max_samples=10)
    rows = torch.cat([b["tokens"] for b in ev])
    assert rows.shape == (10, SEQ) and len(ev) == 3
    flat = np.asarray(held.tokens[: 10 * (SEQ + 1)], np.int64).reshape(10, SEQ + 1)
    assert torch.equal(rows, torch.from_numpy(flat[:, :-1]))
    assert all((b["true_domain"] == 1).all() for b in ev)
    shards = [torch.cat([b["tokens"] for b in EvalBatches(held, SEQ, MBS, 10, r, 2)])
              for r in range(2)]
    assert sorted(map(tuple, torch.cat(shards).tolist())) == sorted(map(tuple, rows.tolist()))
    with pytest.raises(DataError, match="fewer than one sample"):
        EvalBatches(held, 100000, MBS)
