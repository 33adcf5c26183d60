"""The memory planner (`megatron_sgtm/plan.py`, `sgtm plan`).

- Hand arithmetic: the large configs' parameter counts (and Llama 3's published ones for the
  same shapes), the 8B layout's bytes term by term, Korthikanti et al.'s activation formulas,
  megatron's pipeline schedules and optimizer-state sizes.
- A real built model on CPU (one spawn of two gloo ranks: TP 2 without and with sequence
  parallelism, then TP 1): parameter, gradient-buffer and Adam-state bytes must equal the
  plan's exactly, and the bytes autograd saved for backward in one forward must equal the
  plan's block, embedding and loss terms exactly for label-homogeneous sequences (how
  `sgtm train` packs them); pipeline stages (PP 2, PP 2 x VP 2) hold the planned parameters.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import pytest
from _workers_plan import MICRO_BATCH, PIPELINES, experiment, measure_all
from distributed import run_distributed

from megatron_sgtm.config import ModelConfig
from megatron_sgtm.plan import (Layout, checkpoint_input_bytes, in_flight, layer_activation_terms,
                                model_params, plan_memory, plan_stage, stage_params)
from megatron_sgtm.plan_cli import main
from megatron_sgtm.train.config import load_experiment

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "configs" / "train"
# Each large training config and the GPUs its comment says it is laid out for.
LARGE = {"1b_h100x8.yaml": 8, "8b_h100x16.yaml": 16, "70b_h100x128.yaml": 128}
BASE = Layout(tp=1, pp=1, vp=None, sp=False, dp=1, micro_batch=1, micro_batches=1,
              recompute="none", recompute_num_layers=1, distributed_optimizer=False,
              params_dtype="bf16")


def _model(config: str, *overrides: str) -> ModelConfig:
    return load_experiment(TRAIN / config, list(overrides)).model


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("config, overrides, published", [
    ("8b_h100x16.yaml", [], 8_030_261_248),                                # Llama-3-8B
    ("70b_h100x128.yaml", [], 70_553_706_496),                             # Llama-3-70B
    ("1b_h100x8.yaml", ["model.tie_embeddings=true"], 1_235_814_400),     # Llama-3.2-1B
])
def test_large_shapes_have_llama3_published_counts(config, overrides, published):
    """With Llama 3's own 128,256-token vocabulary the shapes are Llama 3's."""
    assert model_params(_model(config, "model.vocab_size=128256", *overrides)) == published


def test_8b_parameters_by_hand():
    model = _model("8b_h100x16.yaml")
    # Per block: qkv (4096 + 2 x 8 x 128) x 4096 = 25,165,824; proj 4096 x 4096 = 16,777,216;
    # fc1 2 x 14336 x 4096 = 117,440,512; fc2 14336 x 4096 = 58,720,256; two RMSNorms 8,192:
    # 218,112,000 per block, 6,979,584,000 for 32. Embeddings and the untied output layer
    # 2 x 129,024 x 4096 = 1,056,964,608; final norm 4,096.
    assert model_params(model) == 8_036_552_704
    # At TP 2 every matrix halves, the 65 RMSNorm weights (266,240) are replicated.
    assert stage_params(model, replace(BASE, tp=2), 0) == (8_036_552_704 - 266_240) // 2 + 266_240
    # Four stages: 8 blocks each; the first adds the embeddings, the last the output layer and
    # the final norm.
    four = [stage_params(model, replace(BASE, pp=4), r) for r in range(4)]
    assert four == [8 * 218_112_000 + 528_482_304, 8 * 218_112_000, 8 * 218_112_000,
                    8 * 218_112_000 + 528_482_304 + 4096]


def test_tied_embeddings_need_a_copy_on_the_last_stage_only_with_a_pipeline():
    model = replace(_model("1b_h100x8.yaml"), tie_embeddings=True)
    vocab_matrix = 129_024 * 2048
    assert stage_params(model, BASE, 0) == model_params(model)
    two = sum(stage_params(model, replace(BASE, pp=2), r) for r in range(2))
    assert two == model_params(model) + vocab_matrix


# -------------------------------------------------------------------------- states and bytes
@pytest.mark.parametrize("dtype, dist_opt, per_param", [
    ("bf16", False, 18.0),         # 2 bf16 weight + 4 fp32 grad + 12 (fp32 main + 2 moments)
    ("bf16", True, 6 + 12 / 8),    # megatron's documented 6 + 12/d for the distributed optimizer
    ("fp32", False, 16.0),         # 4 + 4 + 8: no main copy
    ("fp32", True, 8 + 8 / 8),
])
def test_state_bytes_per_parameter(dtype, dist_opt, per_param):
    model = _model("8b_h100x16.yaml")
    st = plan_stage(model, replace(BASE, tp=2, dp=8, params_dtype=dtype,
                                   distributed_optimizer=dist_opt), 0)
    assert (st.weights + st.grads + st.optimizer) / st.params == per_param


def test_8b_layout_by_hand():
    """configs/train/8b_h100x16.yaml on 16 GPUs: TP 2 + SP, DP 8, micro-batch 1, s 8192."""
    cfg = load_experiment(TRAIN / "8b_h100x16.yaml")
    plan = plan_memory(cfg.model, Layout.of(cfg, 16))
    (st,) = plan.stages
    params = 4_018_409_472
    assert (st.params, st.weights, st.grads, st.optimizer) == (
        params, 2 * params, 4 * params, 12 * params // 8)
    # One block, one micro-batch, on one GPU (s 8192, 4096 tokens per rank in the residual
    # stream under SP; q 2048, k/v 512 and ffn 7168 columns per rank):
    block = {
        "norm inputs": 2 * 2 * 4096 * 4096,                       # 67,108,864
        "norm statistics": 2 * 4 * 4096,
        "qkv and fc1 inputs": 2 * 2 * 4096 * 4096,
        "qkv output": 2 * 8192 * (2048 + 2 * 512),                 # 50,331,648
        "attention output": 2 * 8192 * 2048,
        "rotary q, k and tables": 2 * 8192 * (2048 + 512) + 4 * 2 * 8192 * 128,
        "softmax statistics": 4 * 16 * 8192,
        "mlp activation": 5 * 2 * 8192 * 7168,                     # 587,202,560
    }
    assert layer_activation_terms(cfg.model, plan.layout) == block
    assert sum(block.values()) == 856_195_072
    assert st.activations == 32 * 856_195_072
    # Token ids and the vocab-parallel lookup's range mask; final norm input/output and
    # 1/rms; fp32 softmax over 64,512 vocabulary columns per rank plus targets; the
    # transient bf16 logits.
    assert st.extras == ((8 * 8192 + 8192) + (2 * 2 * 4096 * 4096 + 4 * 4096)
                         + (4 * 8192 * 64_512 + 9 * 8192) + 2 * 8192 * 64_512)
    assert st.total == 60_774_479_872                              # 56.60 GiB
    assert plan.budget == int(80 * 2**30 * (1 - 0.15)) and plan.fits


# ----------------------------------------------------------------------------- activations
GPT = ModelConfig(num_layers=4, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096,
                  vocab_size=50304, seq_length=2048, dropout=0.1)


@pytest.mark.parametrize("tp, sp, per_sbh", [(1, False, 34), (4, False, 10 + 24 / 4),
                                             (4, True, 34 / 4), (8, True, 34 / 8)])
def test_block_activations_follow_korthikanti(tp, sp, per_sbh):
    """34·s·b·h bytes per GPT block (no s² scores: flash attention), 10 + 24/t of it without
    SP at TP t, all of it divided by t with SP; their count has no normalisation or softmax
    statistics (a few bytes per token)."""
    s, b, h = 2048, 2, 1024
    terms = layer_activation_terms(GPT, replace(BASE, tp=tp, sp=sp, micro_batch=b))
    big = sum(terms.values()) - terms["norm statistics"] - terms["softmax statistics"]
    assert big == per_sbh * s * b * h
    assert checkpoint_input_bytes(GPT, replace(BASE, tp=tp, sp=sp, micro_batch=b)) == \
        2 * s * b * h / (tp if sp else 1)


def test_recompute_modes():
    full = replace(BASE, recompute="full", recompute_num_layers=2, micro_batch=2)
    st = plan_stage(GPT, full, 0)
    per_block = sum(layer_activation_terms(GPT, full).values())
    # 4 blocks in checkpoints of 2: two checkpoint inputs, plus one checkpoint re-run.
    assert st.activations == 2 * 2 * 2048 * 2 * 1024 + 2 * per_block
    selective = layer_activation_terms(GPT, replace(BASE, recompute="selective"))
    assert "softmax statistics" not in selective
    assert sum(selective.values()) < sum(layer_activation_terms(GPT, BASE).values())


def test_micro_batches_in_flight_follow_megatrons_schedules():
    one_f_one_b = replace(BASE, pp=4, micro_batches=8)
    assert [in_flight(one_f_one_b, r) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight(replace(one_f_one_b, micro_batches=2), r) for r in range(4)] == [2, 2, 2, 1]
    interleaved = replace(BASE, pp=4, vp=5, micro_batches=128)
    # Warm-up 2(p - r - 1) + (v - 1)p forward chunks, then one more before the first backward.
    assert [in_flight(interleaved, r) for r in range(4)] == [23, 21, 19, 17]
    # With m == p every forward runs before any backward.
    assert in_flight(replace(interleaved, micro_batches=4), 0) == 20
    for p in (2, 4, 8):
        for v in (2, 3, 5):
            lay = replace(BASE, pp=p, vp=v, micro_batches=8 * p)
            # Korthikanti et al.: the first stage of the interleaved schedule holds
            # (1 + (p - 1)/(p v)) x L layers' activations, chunks of L/(p v) layers each.
            assert Fraction(in_flight(lay, 0), p * v) == 1 + Fraction(p - 1, p * v)
        assert in_flight(replace(BASE, pp=p, micro_batches=8 * p), 0) == p   # 1F1B: L layers


# ----------------------------------------------------------------------------- the configs
@pytest.mark.parametrize("config", sorted(LARGE))
def test_large_config_loads_and_fits_on_its_gpus(config, capsys):
    cfg = load_experiment(TRAIN / config)  # validates the partition at the config's TP
    assert cfg.tensor_parallel <= 8, "tensor parallelism stays inside an 8-GPU node"
    assert cfg.model.activation == "swiglu" and cfg.model.normalization == "RMSNorm"
    assert cfg.model.num_query_groups < cfg.model.num_attention_heads
    assert cfg.model.vocab_size % (128 * cfg.tensor_parallel) == 0
    assert main([str(TRAIN / config), "--gpus", str(LARGE[config])]) == 0
    assert "-> fits" in capsys.readouterr().out


@pytest.mark.parametrize("config, overrides, fits", [
    ("8b_h100x16.yaml", ["tensor_parallel=1", "sequence_parallel=false"], False),
    ("8b_h100x16.yaml", ["tensor_parallel=1", "sequence_parallel=false",
                         "model.activation_recompute=full"], True),
    ("8b_h100x16.yaml", ["engine.distributed_optimizer=false"], False),
    ("1b_h100x8.yaml", ["train.micro_batch_size=4"], False),
    ("70b_h100x128.yaml", ["sequence_parallel=false"], False),
    ("70b_h100x128.yaml", ["engine.distributed_optimizer=false"], False),
    ("70b_h100x128.yaml", ["virtual_pipeline_parallel=null"], True),
])
def test_the_configs_comments_alternatives(config, overrides, fits, capsys):
    """The alternatives each config's comment rules out (or keeps) for its choice."""
    status = main([str(TRAIN / config), "--gpus", str(LARGE[config]), *overrides])
    assert status == (0 if fits else 1)
    capsys.readouterr()


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "does not exist"),
    (["8b_h100x16.yaml", "--gpus", "3"], "not divisible by tensor_parallel 2"),
    (["8b_h100x16.yaml", "--gpus", "12"], "global_batch_size 512 is not a multiple"),
    (["8b_h100x16.yaml", "engine.name=deepspeed", "sequence_parallel=false",
      "engine.distributed_optimizer=false"], "models engine.name megatron"),
    (["8b_h100x16.yaml", "--headroom", "1.5"], "--headroom"),
    (["8b_h100x16.yaml", "model.hidden_sise=1"], "unknown key"),
    (["8b_h100x16.yaml", "pipeline_parallel=64"], "exceeds model.num_layers"),
])
def test_bad_input_is_one_error_and_exit_2(args, message, capsys):
    args = [str(TRAIN / args[0]) if args[0].endswith(".yaml") else args[0], *args[1:]]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.out == ""


def test_json_output_and_exit_status_when_it_does_not_fit(capsys):
    assert main([str(TRAIN / "8b_h100x16.yaml"), "--gpus", "16", "--gpu-memory", "40",
                 "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["budget_bytes"] == int(40 * 2**30 * (1 - 0.15))
    assert out["worst_total_bytes"] == 60_774_479_872 == out["stages"][0]["total"]
    assert out["layout"]["dp"] == 8 and out["model"]["parameters"] == 8_036_552_704
    assert {(w["sequence_parallel"], w["recompute"], w["distributed_optimizer"])
            for w in out["what_if"]} == {(sp, rc, d) for sp in (False, True) for d in (False, True)
                                         for rc in ("none", "selective", "full")}


def test_console_script_from_another_folder(tmp_path):
    sgtm = Path(sys.executable).with_name("sgtm")
    done = subprocess.run([str(sgtm), "plan", str(TRAIN / "70b_h100x128.yaml"), "--gpus", "128"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("70b_h100x128.yaml on 128 GPUs of 80 GiB")
    header = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    rows = lines[header + 1:header + 6]
    assert [row.split()[0] for row in rows[:4]] == ["0", "1", "2", "3"] and rows[4] == ""


# ------------------------------------------------------------- a real model's memory on CPU
@pytest.fixture(scope="module")
def measured():  # one spawn of two ranks: ~6 s on a quiet 2-core machine
    """Both ranks' measurements: TP 2 (with and without SP), TP 1 (DP 2), pipeline stages."""
    return run_distributed(measure_all, 2)


def _cpu_layout(tp: int, world: int = 2) -> Layout:
    return replace(BASE, tp=tp, dp=world // tp, micro_batch=MICRO_BATCH, params_dtype="fp32")


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True)])
def test_real_model_memory_equals_the_plan(measured, family, tp, sp):
    got = measured[0][(family, tp, sp)]
    model = experiment(family, tp, sp).model
    st = plan_stage(model, replace(_cpu_layout(tp), sp=sp), 0)
    # Parameters, DDP's fp32 gradient buffer and Adam's two moments (the CPU engine's torch
    # AdamW keeps no fp32 main copy of fp32 weights): exact.
    assert (got["params"], got["weight_bytes"], got["grad_bytes"], got["optimizer_bytes"]) == (
        st.params, st.weights, st.grads, st.optimizer)
    # Saved activations: exact, once one CPU-only difference is added. On CPU torch's
    # rms_norm is its composite, which also saves the fp32 normalised input (one h-wide
    # tensor per norm: 2 per block and the final one); CUDA's fused kernel saves only the
    # input and 1/rms, as the plan counts.
    tokens = MICRO_BATCH * model.seq_length // (tp if sp else 1)
    composite_rms = (2 * model.num_layers + 1) * 4 * tokens * model.hidden_size \
        if model.normalization == "RMSNorm" else 0
    expected = st.activations + st.extras + composite_rms
    assert got["saved_bytes"] == expected
    # Labels mixed inside sequences (which `sgtm train`'s packing never produces) take the
    # per-token path: its retain-path gates and int64 token indices add a few percent.
    assert expected < got["saved_bytes_per_token_labels"] <= 1.10 * expected


@pytest.mark.parametrize("family, pp, vp, num_layers", PIPELINES)
def test_real_pipeline_stages_hold_the_planned_parameters(measured, family, pp, vp, num_layers):
    """Built as megatron splits them (`build_model_chunks`): the first stage's chunks hold the
    embeddings, the last stage's the final norm and the output layer (a copy when tied)."""
    model = experiment(family, 1, pp=pp, vp=vp, num_layers=num_layers).model
    got = dict(rank[("stage", family, pp, vp)] for rank in measured)
    layout = replace(BASE, pp=pp, vp=vp, micro_batches=pp, params_dtype="fp32")
    assert got == {r: stage_params(model, layout, r) for r in range(pp)}
    if model.tie_embeddings:
        assert sum(got.values()) == model_params(model) + model.vocab_size * model.hidden_size
