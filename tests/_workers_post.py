"""Worker functions for the post-training tests (spawned gloo processes, one import each)."""
from __future__ import annotations

import torch

FAMILIES = {
    "mha_gelu": dict(num_layers=2, hidden_size=32, num_attention_heads=8, ffn_hidden_size=64,
                     vocab_size=96, seq_length=12, tie_embeddings=True),
    "gqa_swiglu": dict(num_layers=3, hidden_size=64, num_attention_heads=16, num_query_groups=8,
                       ffn_hidden_size=64, vocab_size=96, seq_length=12, activation="swiglu",
                       position_embedding="rope", normalization="RMSNorm", tie_embeddings=False),
}
PARTITION = dict(forget_heads=2, forget_mlp_units=8, max_tp=2)


def core_config(family: str, tp: int, variant: str = "default"):
    from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig

    return CoreConfig(model=ModelConfig(**FAMILIES[family]), partition=PartitionConfig(**PARTITION),
                      routing=RoutingConfig(method="sgtm", variant=variant), tensor_parallel=tp)


def make_batches(family: str, n: int, seed: int, b: int = 3):
    from megatron_sgtm.post.common import Batch

    spec = FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        toks = torch.randint(0, spec["vocab_size"], (b, spec["seq_length"] + 1), generator=gen)
        mask = torch.ones(b, spec["seq_length"])
        mask[0, :3] = 0  # some positions never count
        out.append(Batch(toks[:, :-1].contiguous(), toks[:, 1:].contiguous(), mask))
    return out


def build(family: str, tp: int, variant: str = "default", full=None):
    """A model whose biases and norms are perturbed (so zeroing them is visible)."""
    from megatron_sgtm.model import build_model
    from megatron_sgtm.post.layout import gather_full_params, load_full_params

    torch.manual_seed(1234)
    model = build_model(core_config(family, tp, variant))
    if full is None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "layernorm" in name:
                    p.add_(0.1 * torch.randn_like(p))
                else:
                    p.mul_(3.0)
        full = gather_full_params(model)
    load_full_params(model, full)
    return model, full


def ablation_checks(tp, rank, fulls=None):
    """Per (family, variant): forget max after zeroing, ablated vs retain-mode logits and eval,
    and everything tests need to compare across TP sizes."""
    from megatron_sgtm.post import ablate, common, evaluate
    from megatron_sgtm.post.layout import gather_full_params

    out = {}
    for family in FAMILIES:
        for variant in ("default", "joint_projection", "joint_attention"):
            key = (family, variant)
            model, full = build(family, tp, variant, None if fulls is None else fulls[key])
            data = make_batches(family, 2, seed=5)
            tokens = data[0].tokens
            with common.retain_mode(tokens), torch.no_grad():
                retain_logits = common.full_logits(common.logits(model, tokens))
            with common.retain_mode(tokens):
                retain_eval = evaluate.evaluate_split(model, "forget", data)
            before = ablate.max_abs_forget(model)
            ablate.zero_forget_(model)
            with torch.no_grad():
                ablated_logits = common.full_logits(common.logits(model, tokens))
            ablated_eval = evaluate.evaluate_split(model, "forget", data)
            out[key] = dict(full=full, before=before, after=ablate.max_abs_forget(model),
                            retain_logits=retain_logits, ablated_logits=ablated_logits,
                            retain_eval=retain_eval, ablated_eval=ablated_eval,
                            ablated_full=gather_full_params(model))
    return out


def world_tp1(rank, world):
    from megatron_sgtm.parallel import init_parallel
    from megatron_sgtm.post import ablate, common, export_hf
    from megatron_sgtm.post.layout import load_full_params
    from megatron_sgtm.model import build_model

    init_parallel(1, seed=0)
    out = {"ablation": ablation_checks(1, 0)}
    prune, hf = {}, {}
    for (family, variant), res in out["ablation"].items():
        tokens = make_batches(family, 1, seed=5)[0].tokens
        core = core_config(family, 1, variant)
        new_core, pruned = ablate.prune_full_params(res["ablated_full"], core)
        small = build_model(new_core)
        load_full_params(small, pruned)
        with torch.no_grad():
            prune[(family, variant)] = dict(
                logits=common.logits(small, tokens), core=new_core,
                params=sum(p.numel() for p in small.parameters()),
                params_full=sum(t.numel() for t in res["ablated_full"].values()))
            hf_model = export_hf.to_hf(res["ablated_full"], core)
            hf[(family, variant)] = dict(logits=hf_model(tokens).logits,
                                         arch=type(hf_model).__name__)
            try:  # exact, or refused in one message when HF cannot hold the pruned heads
                hf[(family, variant)]["pruned_logits"] = export_hf.to_hf(pruned, new_core)(tokens).logits
            except export_hf.ExportError as exc:
                hf[(family, variant)]["pruned_error"] = str(exc)
    out["prune"], out["hf"] = prune, hf
    out["hf_import"] = hf_import_checks(out["ablation"])
    out["calibration"] = calibration_check(1)
    out["generation"] = generation_check(1, out["ablation"][("mha_gelu", "default")]["full"])
    out["tools"] = train_tools()
    return out


def hf_import_checks(ablation) -> dict:
    """Export each ablated model with save_pretrained (safetensors), load it back through
    hf_import, with and without its sgtm_export.json record."""
    import tempfile
    from pathlib import Path

    from megatron_sgtm.post import common, export_hf, hf_import

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (family, variant), res in ablation.items():
            tokens = make_batches(family, 1, seed=5)[0].tokens
            core = core_config(family, 1, variant)
            path = Path(tmp) / f"{family}-{variant}"
            export_hf.to_hf(res["ablated_full"], core).save_pretrained(path)
            hf_import.write_record(path, core, {"step": 3})
            back = hf_import.full_params(hf_import.read_safetensors(path), core, path)
            model, got_core, meta = hf_import.load(path, 1)
            (path / hf_import.RECORD_FILE).unlink()
            bare, bare_core, _ = hf_import.load(path, 1)
            with torch.no_grad():
                out[(family, variant)] = dict(
                    exact=sorted(back) == sorted(res["ablated_full"]) and all(
                        torch.equal(back[k], v) for k, v in res["ablated_full"].items()),
                    logits=common.logits(model, tokens), bare_logits=common.logits(bare, tokens),
                    method=got_core.routing.method, bare_method=bare_core.routing.method,
                    variant=got_core.routing.variant, step=meta["step"])
    return out


def world_tp2(rank, world, fulls, gen_full):
    from megatron_sgtm.parallel import init_parallel

    init_parallel(2, seed=0)
    return {"ablation": ablation_checks(2, rank, fulls), "calibration": calibration_check(2),
            "generation": generation_check(2, gen_full)}


def calibration_check(tp):
    """Snapshot every parameter, calibrate, and report which changed and the objective."""
    from megatron_sgtm.post import calibration, evaluate

    model, _ = build("gqa_swiglu", tp)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forget, retain = make_batches("gqa_swiglu", 2, 1), make_batches("gqa_swiglu", 2, 2)
    cfg = calibration.CalibrationConfig(steps=30)
    bias = calibration.calibrate_output_bias(model, forget, retain, cfg=cfg)
    uncached = calibration.calibrate_output_bias(
        model, forget, retain, cfg=calibration.CalibrationConfig(steps=30, cache_elements=0))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    objective = lambda b: (evaluate.evaluate_split(model, "f", forget, b).loss  # noqa: E731
                           + cfg.alpha * evaluate.evaluate_split(model, "r", retain, b).loss)
    return dict(changed=changed, grads=grads, uncached_diff=float((uncached - bias).abs().max()), bias_norm=float(bias.norm()),
                bias_shape=tuple(bias.shape), objective_before=objective(None),
                objective_after=objective(bias))


def generation_check(tp, full):
    from megatron_sgtm.post import generation

    model, _ = build("mha_gelu", tp, full=full)
    prompts = make_batches("mha_gelu", 1, 9)[0].tokens[:, :4]
    greedy = generation.generate(model, prompts, generation.SamplingConfig(
        max_new_tokens=10, temperature=0.0))
    sampled = [generation.generate(model, prompts, generation.SamplingConfig(
        max_new_tokens=10, temperature=1.0, top_k=5, seed=s)) for s in (3, 3, 4)]
    return dict(greedy=greedy, sampled=sampled)


def train_tools():
    """Attack and RMU on a tiny model (TP=1)."""
    from megatron_sgtm.post import attack, rmu

    model, _ = build("gqa_swiglu", 1)
    # A learnable target: one fixed batch, repeated, so a few steps drop its loss.
    forget = make_batches("gqa_swiglu", 1, 11)
    retain = make_batches("gqa_swiglu", 1, 12)
    cfg = attack.AttackConfig(lr=1e-2, warmup_steps=2, cosine_steps=40, max_steps=30, eval_every=5)
    from megatron_sgtm.post.evaluate import evaluate_split

    start = evaluate_split(model, "forget", forget).loss
    res = attack.adversarial_finetune(model, iter(forget * 100), iter(retain * 100), forget,
                                      target_loss=start * 0.7, cfg=cfg)
    rmu_model, _ = build("gqa_swiglu", 1)
    before = {n: p.detach().clone() for n, p in rmu_model.named_parameters()}
    rcfg = rmu.RMUConfig(layer=2, steering_coeff=5.0, alpha=10.0, lr=1e-3, steps=20)
    history = rmu.rmu_unlearn(rmu_model, iter(forget * 100), iter(retain * 100), rcfg)
    changed = sorted(n for n, p in rmu_model.named_parameters() if not torch.equal(p, before[n]))
    return dict(start=start, attack=res, rmu_history=history, rmu_changed=changed,
                rmu_updatable=rmu.updated_param_names(rmu_model, 2))
