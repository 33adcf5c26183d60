"""A named method entry trains for real: ``sgtm_me: {method: sgtm, mask_embeddings: true}``
on a one-size micro-study (a few steps), plus param_count against built models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_sgtm.study.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = f"""name: named
recipe: {ROOT / "configs/data/bilingual.yaml"}
data_overrides: [max_docs=300, split.max_test_docs=20, tokenizer.vocab_size=400,
                 tokenizer.max_train_bytes=200000]
sizes:
  - {{name: s16, num_layers: 1, hidden_size: 16, num_attention_heads: 2, ffn_hidden_size: 64,
     forget_mlp_units: 8}}
token_budgets: [2048]
methods:
  no_filter: {{}}
  sgtm_me: {{method: sgtm, mask_embeddings: true}}
undiscovered_rates: [0.1]
train: {{seq_length: 32, batch_size: 16, lr: 0.005, curve_points: 2, curve_eval_sequences: 4}}
eval: {{max_sequences: 16, calibration_steps: 2, generation_prompts: 2, generation_tokens: 4}}
"""


@pytest.fixture(scope="module")
def named_study(tmp_path_factory):
    import megatron_sgtm.model as model_mod

    tmp = tmp_path_factory.mktemp("named")
    (tmp / "spec.yaml").write_text(SPEC)
    cores = []
    real = model_mod.build_model
    patch = pytest.MonkeyPatch()
    patch.setattr(model_mod, "build_model", lambda core, *a, **k: cores.append(core) or real(core, *a, **k))
    try:
        assert main([str(tmp / "spec.yaml"), "--out", str(tmp / "out")]) == 0
    finally:
        patch.undo()
    return tmp / "out", cores


def _forget_grad_norms(core) -> dict[str, float]:
    """Gradient norms of one forget-labelled step, through the study's own trainer setup."""
    from megatron_sgtm.model import build_model
    from megatron_sgtm.study.engine import batch_of, experiment
    from megatron_sgtm.study.spec import TrainSpec
    from megatron_sgtm.train.batches import InputBuilder
    from megatron_sgtm.train.engine import build_engine
    from megatron_sgtm.train.grads import grad_of
    from megatron_sgtm.train.loop import accumulate_grads
    from megatron_sgtm.transfer import compute_device

    torch.manual_seed(0)
    model = build_model(core)
    cfg = experiment(model, TrainSpec(seq_length=32, batch_size=4), steps=1)
    engine = build_engine(model, cfg)
    builder = InputBuilder(cfg, compute_device())
    rows = torch.randint(0, core.model.vocab_size, (4, 33)).numpy()
    accumulate_grads(engine, builder, [batch_of(rows, labels=[2] * 4)], builder.device)
    grads = {n: grad_of(p) for n, p in model.named_parameters()}
    return {n: 0.0 if g is None else float(g.norm()) for n, g in grads.items()}


@pytest.mark.slow
def test_named_entry_trains_with_its_settings_and_is_labelled_by_name(named_study):
    out, cores = named_study
    rows = {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"no_filter", "sgtm_me"}
    me = rows["sgtm_me"]
    assert me["run_id"] == "s16-2048-sgtm_me-u0.1-s0" and me["base_method"] == "sgtm"
    assert me["status"] == "done" and me["steps"] == 4
    for key in ("retain_loss", "forget_loss", "retain_loss_raw", "forget_loss_raw"):
        assert math.isfinite(me[key]), key
    # SGTM routed labels (the relabelled copy at rate 0.1), no_filter trained label-free.
    assert 0 < me["undiscovered_tokens_seen"] < me["forget_tokens_seen"]
    # Training and evaluation both built the model with mask-embeddings; no_filter without routing.
    routings = {(c.routing.method, c.routing.mask_embeddings) for c in cores}
    assert routings == {("none", False), ("sgtm", True)}
    me_core = next(c for c in cores if c.routing.mask_embeddings)
    # What mask-embeddings implies: forget data leaves the embedding (and norms) untouched,
    # while plain SGTM lets it train them.
    masked = _forget_grad_norms(me_core)
    assert masked["embedding.word_embeddings.weight"] == 0.0
    block_norms = [n for n in masked if ".layers." in n and "layernorm" in n]
    assert block_norms and all(masked[n] == 0.0 for n in block_norms)
    plain = _forget_grad_norms(type(me_core)(model=me_core.model, partition=me_core.partition))
    assert plain["embedding.word_embeddings.weight"] > 0.0
    assert all(plain[n] > 0.0 for n in block_norms)
    # The analysis treats the entry as a routing run (its base), under its own name.
    (leak,) = json.loads((out / "analysis.json").read_text())["leakage"]
    assert leak["run_id"] == me["run_id"] and leak["method"] == "sgtm_me"
    assert "sgtm_me" in (out / "results.csv").read_text()


@pytest.mark.parametrize("arch", [
    {},
    {"num_query_groups": 2, "activation": "swiglu", "position_embedding": "rope",
     "normalization": "RMSNorm", "tie_embeddings": False},
    {"num_query_groups": 1, "normalization": "RMSNorm"},
])
def test_param_count_matches_the_built_model(arch):
    from megatron_sgtm.model import build_model
    from megatron_sgtm.study.compute import param_count
    from megatron_sgtm.study.engine import core_config, worker_init
    from megatron_sgtm.study.spec import SizeSpec

    worker_init(1)
    size = SizeSpec(name="a", num_layers=2, hidden_size=32, num_attention_heads=4,
                    ffn_hidden_size=48, forget_heads=0, forget_mlp_units=8, **arch)
    model = build_model(core_config(size, 100, 16))
    params = {n: p.numel() for n, p in model.named_parameters()}
    embedding = sum(v for n, v in params.items() if n.startswith(("embedding.", "output_layer.")))
    counted = param_count(size, 100, 16)
    assert counted["total"] == sum(params.values())
    assert counted["non_embedding"] == sum(params.values()) - embedding
