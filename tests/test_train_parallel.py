"""Training at DP=2, TP=2 and DP x TP = 2 x 2 equals single-process training with the same
global batch; the loss falls on real text; DeepSpeed ZeRO-1/2 match the default engine, also
with full activation recompute."""
from __future__ import annotations

import pytest

import json

from _workers_train import losses, read_metrics, train_variants
from distributed import run_distributed
from megatron_sgtm.data.testing import write_sample_shards

STEPS = 10
# Global batch 16 of micro-batches of 4: two accumulated micro-batches per step at DP=2.
ACCUM = ["train.global_batch_size=16"]
# Keyed hidden dropout (megatron_sgtm/dropout.py); attention dropout is the kernel's own draw.
DROPOUT = ["model.dropout=0.2", "model.attention_dropout=0"]
METHODS = ["none", "gradient_routing", "activation_masking", "weak_filter", "strict_filter",
           "slung", "conditional"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_sample_shards(path, n_train=200, n_test=20)
    return str(path)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    methods = [(m, 3, [f"data.method={m}"]) for m in METHODS]
    methods.append(("slung_unlikelihood", 3, ["data.method=slung", "data.slung_mode=unlikelihood"]))
    results = run_distributed(train_variants, 1, shards, str(root),
                              [("single", STEPS, []), ("single_accum", STEPS, ACCUM),
                               ("single_dropout", STEPS, DROPOUT)] + methods)[0]
    (root / "results.json").write_text(json.dumps(results))
    run_distributed(train_variants, 2, shards, str(root), [
        ("dp2", STEPS, []),
        ("dp2_accum", STEPS, ACCUM),
        ("dp2_dropout", STEPS, DROPOUT),
        ("dp2_accum_no_overlap", STEPS, ACCUM + ["engine.overlap_grad_reduce=false"]),
        ("tp2", STEPS, ["tensor_parallel=2"]),
        ("zero1", STEPS, ["engine.name=deepspeed", "engine.zero_stage=1"]),
        ("zero2", STEPS, ["engine.name=deepspeed", "engine.zero_stage=2"]),
        ("zero2_resumed", STEPS, ["engine.name=deepspeed", "engine.zero_stage=2"], True),
        ("zero2_recompute", STEPS, ["engine.name=deepspeed", "engine.zero_stage=2",
                                    "model.activation_recompute=full"]),
    ])
    run_distributed(train_variants, 4, shards, str(root), [("dp2tp2", STEPS, ["tensor_parallel=2"])])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp2", "tp2", "dp2tp2"])
def test_parallel_layouts_match_single_process(runs, name):
    single, other = losses(runs / "single"), losses(runs / name)
    assert len(single) == len(other) == STEPS
    assert other == pytest.approx(single, rel=1e-5)


@pytest.mark.slow
def test_dropout_masks_do_not_depend_on_the_data_parallel_size(runs):
    # Each sequence's mask is keyed by its place in the global data order, not by its rank.
    single, other = losses(runs / "single_dropout"), losses(runs / "dp2_dropout")
    assert len(other) == STEPS and other == pytest.approx(single, rel=1e-5)
    assert single != losses(runs / "single")  # dropout is on


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp2_accum", "dp2_accum_no_overlap"])
def test_accumulation_with_and_without_overlapped_reduction(runs, name):
    # With overlap, buckets reduce during the last micro-batch's backward only (no_sync
    # before it); either way the step equals one process accumulating the same batch.
    single, other = losses(runs / "single_accum"), losses(runs / name)
    assert len(other) == STEPS
    assert other == pytest.approx(single, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "dp2", "tp2", "dp2tp2"])
def test_loss_falls_on_real_text(runs, name):
    curve = losses(runs / name)
    assert curve[-1] < curve[0] - 0.5, curve


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_default_engine(runs, stage):
    assert losses(runs / f"zero{stage}") == pytest.approx(losses(runs / "dp2"), rel=1e-5)


def _last_counts(run_dir):
    return [r for r in read_metrics(run_dir) if "tokens/forget" in r][-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS + ["slung_unlikelihood"])
def test_every_method_trains(runs, name):
    results = json.loads((runs / "results.json").read_text())
    assert "error" not in results[name], results[name]
    curve = losses(runs / name)
    assert len(curve) == 3 and all(c == c for c in curve)
    counts = _last_counts(runs / name)
    if name == "weak_filter":
        assert counts["tokens/forget"] == 0 and counts["tokens/unlabeled"] > 0
    if name == "strict_filter":
        assert counts["tokens/forget"] == 0
        assert sum(counts[f"true_adjacent->{a}"] for a in ("unlabeled", "retain", "forget")) == 0
    if name in ("none", "slung", "conditional"):
        assert counts["tokens/forget"] > 0  # labels are seen (and counted), not dropped


@pytest.mark.slow
def test_slung_masks_the_loss_of_flagged_tokens(runs):
    # Forget-labelled targets contribute no loss: the first-step loss (same initial weights,
    # same batch) is the no-filter loss with those tokens' terms removed.
    first = {m: losses(runs / m)[0] for m in ("none", "slung")}
    assert first["slung"] < 0.9 * first["none"]


@pytest.mark.slow
def test_deepspeed_with_full_recompute_is_bitwise_equal(runs):
    # The recomputed forward runs inside DeepSpeed's backward, under the micro-batch's routing.
    assert losses(runs / "zero2_recompute") == losses(runs / "zero2")


@pytest.mark.slow
def test_deepspeed_resumes_exactly(runs):
    # Checkpoints at steps 5 and 10; the step-10 one was deleted and the run started again,
    # so steps 6-10 were trained twice: from memory, and from the step-5 checkpoint.
    lines = [r for r in read_metrics(runs / "zero2_resumed") if "loss" in r]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1)) + list(range(6, STEPS + 1))
    assert losses(runs / "zero2_resumed") == losses(runs / "zero2")
    assert [r["loss"] for r in lines[STEPS:]] == [r["loss"] for r in lines[5:STEPS]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2", "dp2tp2"])
def test_partition_grad_norms_add_up_and_ignore_tp(runs, name):
    def norms(run):
        return [(r["grad_norm"], r["grad_norm/forget"], r["grad_norm/retain"], r["grad_norm/joint"])
                for r in read_metrics(runs / run) if "grad_norm/forget" in r]

    single, other = norms("single"), norms(name)
    assert len(single) == STEPS
    for total, forget, retain, joint in single:
        assert forget > 0 and retain > 0 and joint > 0
        assert forget ** 2 + retain ** 2 + joint ** 2 == pytest.approx(total ** 2, rel=1e-4)
    # Sharded tensors counted once per TP group, replicated ones once: same norms at TP=2.
    flat = [x for row in other for x in row]
    assert flat == pytest.approx([x for row in single for x in row], rel=1e-4)


@pytest.mark.parametrize("overlap", [True, False])
def test_one_gradient_reduction_per_step_with_accumulation(shards, overlap):
    from _workers_train import count_grad_reductions

    for rank in run_distributed(count_grad_reductions, 2, shards, overlap):
        assert rank["calls"] == rank["buckets"] >= 1, rank
