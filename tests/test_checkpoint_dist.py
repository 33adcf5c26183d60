"""Checkpoints on real process groups, gloo on CPU: one process, then TP=2, then DP=2.

Three spawns in all: the single process saves a TP=1 checkpoint and round-trips it; the TP=2
run first loads that checkpoint (resharding 1 -> 2), then saves, reloads and probes the
failure modes; the DP=2 run loads the TP=2 checkpoint (resharding 2 -> 1), then repeats the
whole roundtrip at TP=1.
"""
import pytest
import torch

from distributed import run_distributed
import _workers_ckpt as workers


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_single")
    return root, run_distributed(workers.single_process, 1, str(root))[0]


@pytest.fixture(scope="module")
def tp2(single, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_tp2")
    return root, run_distributed(workers.reshard_then_roundtrip, 2, 2, str(single[0]), str(root))


@pytest.fixture(scope="module")
def dp2(tp2, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_dp2")
    return root, run_distributed(workers.reshard_then_roundtrip, 2, 1, str(tp2[0]), str(root))


def _check_roundtrip(results):
    for r in results:
        assert r["saved"].keys() == r["loaded"].keys()
        assert any(k.endswith("exp_avg_sq") for k in r["saved"])
        for key, value in r["saved"].items():
            assert torch.equal(value, r["loaded"][key]), key
        original, resumed = r["continued"]
        for key, value in original.items():
            assert torch.equal(value, resumed[key]), f"after one more step: {key}"
        assert r["rng_equal"]


def _check_probes(root, results):
    r = results[0]
    # keep_last=2 removed step 1; the simulated interrupted save is ignored.
    assert r["dirs"] == ["latest", "step_00000002", "step_00000003", "step_00000004.tmp-deadbeef"]
    assert r["latest"] == str(root / "step_00000003")
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert "partition 'forget_groups'" in r["mismatch"]
    assert "tensor 'decoder.layers.mlp.linear_fc1.weight'" in r["shape_mismatch"]
    assert r["untouched"] and r["files_same"]
    for rank, res in enumerate(results):
        assert res["extra"]["step"] == 3 and res["extra"]["rank_note"] == f"r{rank}s3"


def test_single_process_roundtrip_metadata_and_config_mismatch(single):
    root, r = single
    assert r["saved"].keys() == r["loaded"].keys()
    assert any(k.endswith("exp_avg_sq") for k in r["saved"])
    for key, value in r["saved"].items():
        assert torch.equal(value, r["loaded"][key]), key
    meta = r["meta"]
    assert meta["step"] == 2 and meta["tp"] == 1 and meta["dp"] == 1
    assert meta["partition_meta"] == meta["partition"] and meta["partition_meta"]["forget_mlp"]
    assert meta["extra"] == {"step": 2, "rank_note": "r0s2"}
    assert meta["config"]["model"]["hidden_size"] == 64
    assert r["extra"]["checkpoint"] == str(root / "step_00000002")
    assert "model 'tie_embeddings'" in r["config_mismatch"]
    assert r["untouched"] and r["files_same"]
    assert (root / "latest").read_text().strip() == "step_00000002"


def test_tp1_checkpoint_loads_at_tp2_with_equal_full_tensors(single, tp2):
    saved_full = single[1]["full"]
    for res in tp2[1]:
        got = res["resharded"]["full"]
        assert got.keys() == saved_full.keys()
        assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in got)
        for key, value in saved_full.items():
            assert torch.equal(value, got[key]), key
        # Fewer ranks saved than load: every rank gets rank 0's extra.
        assert res["resharded"]["extra"]["rank_note"] == "r0s2"


def test_tp2_roundtrip_is_bitwise_and_resume_continues_identically(tp2):
    _check_roundtrip(tp2[1])


def test_tp2_interrupted_save_keep_last_and_mismatch(tp2):
    _check_probes(*tp2)
    meta = tp2[1][0]["meta"]
    assert meta["step"] == 3 and meta["tensor_parallel"] == 2 and meta["optimizer"] == "torch"
    assert meta["partition"]["forget_groups"] == [3, 7]
    assert meta["config"]["partition"]["forget_heads"] == 2
    assert meta["versions"]["megatron_core"].startswith("0.16")


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1_with_equal_full_tensors(tp2, dp2):
    saved_full = tp2[1][0]["full"]
    for res in dp2[1]:
        got = res["resharded"]["full"]
        assert got.keys() == saved_full.keys()
        assert any(k.startswith("optimizer.state.exp_avg.") for k in got)
        for key, value in saved_full.items():
            assert torch.equal(value, got[key]), key
    assert [r["resharded"]["extra"]["rank_note"] for r in dp2[1]] == ["r0s3", "r1s3"]


@pytest.mark.slow
def test_dp2_roundtrip_and_probes(dp2):
    _check_roundtrip(dp2[1])
    _check_probes(*dp2)
    assert dp2[1][0]["meta"]["data_parallel"] == 2
