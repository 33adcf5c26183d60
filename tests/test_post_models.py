"""Post-training tools on real megatron-core models at TP=1 and TP=2.

- Ablation zeroes every theta_forget entry exactly, and the ablated model's logits and eval
  equal the retain-mode forward of the unablated model.
- Pruned models and Hugging Face exports reproduce the ablated model's logits.
- Calibration changes only the output bias; generation is deterministic and TP-invariant.
- Adversarial fine-tuning and RMU update what they should.
"""
from __future__ import annotations

import pytest
import torch

from _workers_post import FAMILIES, world_tp1, world_tp2
from distributed import run_distributed

CASES = [(f, v) for f in FAMILIES for v in ("default", "joint_projection", "joint_attention")]


@pytest.fixture(scope="module")
def tp1():
    return run_distributed(world_tp1, 1)[0]


@pytest.fixture(scope="module")
def tp2(tp1):
    fulls = {k: v["full"] for k, v in tp1["ablation"].items()}
    return run_distributed(world_tp2, 2, fulls, fulls[("mha_gelu", "default")])


@pytest.mark.parametrize("case", CASES, ids=["/".join(c) for c in CASES])
def test_ablation_zeroes_forget_exactly_and_equals_retain_mode(tp1, tp2, case):
    for what, res in [("tp1", tp1["ablation"][case])] + [
            (f"tp2 rank {r}", out["ablation"][case]) for r, out in enumerate(tp2)]:
        assert res["before"] > 0, f"{what}: theta_forget was already zero (vacuous test)"
        assert res["after"] == 0.0, f"{what}: theta_forget max |x| = {res['after']}"
        diff = (res["ablated_logits"] - res["retain_logits"]).abs().max().item()
        assert diff < 1e-5, f"{what}: ablated vs retain-mode logits differ by {diff}"
        assert res["ablated_eval"].loss == pytest.approx(res["retain_eval"].loss, abs=1e-5)
        assert res["ablated_eval"].accuracy == pytest.approx(res["retain_eval"].accuracy)
        assert res["ablated_eval"].tokens == 3 * 12 * 2 - 2 * 3  # loss mask honoured


@pytest.mark.parametrize("case", CASES, ids=["/".join(c) for c in CASES])
def test_tp2_ablation_gathers_to_the_tp1_ablation(tp1, tp2, case):
    ref = tp1["ablation"][case]
    for out in tp2:
        res = out["ablation"][case]
        for name, tensor in ref["ablated_full"].items():
            assert torch.allclose(res["ablated_full"][name], tensor, atol=0, rtol=0), name
        assert (res["ablated_logits"] - ref["ablated_logits"]).abs().max() < 1e-4


def test_ablation_leaves_output_biases_and_retain_weights(tp1):
    res = tp1["ablation"][("mha_gelu", "default")]
    full, ablated = res["full"], res["ablated_full"]
    for name in full:
        if name.endswith(("linear_proj.bias", "linear_fc2.bias")) or "layernorm" in name \
                or "embedding" in name:
            assert torch.equal(full[name], ablated[name]), name
    changed = (full["decoder.layers.0.mlp.linear_fc1.weight"]
               != ablated["decoder.layers.0.mlp.linear_fc1.weight"]).any(dim=1)
    assert int(changed.sum()) == 8  # exactly the forget MLP units' rows


@pytest.mark.parametrize("case", CASES, ids=["/".join(c) for c in CASES])
def test_pruned_model_matches_zeroed_model(tp1, case):
    pruned, ref = tp1["prune"][case], tp1["ablation"][case]["ablated_logits"]
    assert (pruned["logits"] - ref).abs().max() < 1e-5
    assert pruned["params"] < pruned["params_full"]
    family, variant = case
    spec = FAMILIES[family]
    assert pruned["core"].model.ffn_hidden_size == spec["ffn_hidden_size"] - 8
    heads_removed = 0 if variant == "joint_attention" else 2 * (
        spec["num_attention_heads"] // (spec.get("num_query_groups") or spec["num_attention_heads"]))
    assert pruned["core"].model.num_attention_heads == spec["num_attention_heads"] - heads_removed


@pytest.mark.parametrize("case", CASES, ids=["/".join(c) for c in CASES])
def test_hf_export_matches_zeroed_model(tp1, case):
    hf = tp1["hf"][case]
    assert hf["arch"] == ("GPT2LMHeadModel" if case[0] == "mha_gelu" else "LlamaForCausalLM")
    assert (hf["logits"] - tp1["ablation"][case]["ablated_logits"]).abs().max() < 1e-4
    if case[1] == "joint_attention":  # only MLP units pruned: the export stays exact
        assert (hf["pruned_logits"] - tp1["ablation"][case]["ablated_logits"]).abs().max() < 1e-4
    else:  # fewer heads of the old width: HF configs need hidden divisible by heads
        assert "export the zeroed, not the pruned" in hf["pruned_error"]


@pytest.mark.parametrize("case", CASES, ids=["/".join(c) for c in CASES])
def test_hf_export_loads_back_bit_exact(tp1, case):
    got = tp1["hf_import"][case]
    assert got["exact"], "safetensors export -> megatron layout is not the exported tensors"
    ablated = tp1["ablation"][case]["ablated_logits"]
    assert (got["logits"] - ablated).abs().max() < 1e-5
    assert (got["bare_logits"] - ablated).abs().max() < 1e-5  # config.json alone suffices
    assert (got["method"], got["variant"], got["step"]) == ("sgtm", case[1], 3)
    assert got["bare_method"] == "none"  # without the record, nothing claims theta_forget


def test_calibration_changes_only_the_output_bias(tp1, tp2):
    for what, cal in [("tp1", tp1["calibration"])] + [
            (f"tp2 rank {r}", o["calibration"]) for r, o in enumerate(tp2)]:
        assert cal["changed"] == [], f"{what}: model parameters changed: {cal['changed']}"
        assert cal["grads"] == [], f"{what}: model parameters got gradients"
        assert cal["bias_norm"] > 0
        assert cal["uncached_diff"] < 1e-5, f"{what}: recomputed logits give another bias"
        assert cal["objective_after"] < cal["objective_before"]
    assert tp1["calibration"]["bias_shape"] == (96,)
    assert tp2[0]["calibration"]["bias_shape"] == (48,)  # this rank's vocabulary shard


def test_generation_is_seeded_and_tp_invariant(tp1, tp2):
    g1 = tp1["generation"]
    assert g1["sampled"][0] == g1["sampled"][1]
    assert g1["sampled"][0] != g1["sampled"][2]
    assert all(len(row) == 10 for row in g1["greedy"])
    for out in tp2:
        assert out["generation"]["greedy"] == g1["greedy"]
        assert out["generation"]["sampled"] == tp2[0]["generation"]["sampled"]


@pytest.fixture(scope="module")
def tools(tp1):
    return tp1["tools"]


def test_attack_reaches_target_and_reports_tokens(tools):
    res = tools["attack"]
    assert res.curve[0]["step"] == 0 and res.curve[0]["forget_loss"] == pytest.approx(tools["start"])
    assert res.steps_to_target is not None and res.steps_to_target % 5 == 0
    assert res.forget_tokens_to_target == res.steps_to_target * (3 * 12 - 3)
    assert res.curve[-1]["forget_loss"] <= res.target_loss < res.curve[-2]["forget_loss"]


def test_rmu_updates_only_the_steered_mlps(tools):
    assert tools["rmu_changed"] == sorted(tools["rmu_updatable"])
    assert all(".mlp." in n and n.split(".")[2] in ("0", "1", "2") for n in tools["rmu_changed"])
    hist = tools["rmu_history"]
    assert hist[-1]["forget_mse"] < hist[0]["forget_mse"]
