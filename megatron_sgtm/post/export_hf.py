"""Export a model (full TP=1 parameter layout) as a Hugging Face transformers model.

- learned positions + LayerNorm + GELU  -> GPT-2 (``activation_function='gelu'`` is exact
  ``F.gelu``, like megatron's);
- rope + SwiGLU + RMSNorm                -> Llama;
- the same with every block MoE          -> Mixtral (softmax over the chosen top-k experts,
  no shared expert): the router is ``gate``, expert e's fc1 ``[gate; up]`` is its fused
  ``gate_up_proj[e]`` and fc2 its ``down_proj[e]``.

Megatron's qkv rows are grouped per query group as ``[q x heads_per_group, k, v]`` (head_dim
rows each); HF wants separate q / k / v blocks (GPT-2: one ``c_attn`` = [q; k; v], stored as a
Conv1D with ``[in, out]`` weights).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import CoreConfig


class ExportError(ValueError):
    """The model has a feature the target architecture cannot express exactly."""


def split_qkv(weight: torch.Tensor, groups: int, heads_per_group: int, head_dim: int):
    """``[groups*(hpg+2)*hd, ...]`` interleaved rows -> (q, k, v) in head order."""
    rest = weight.shape[1:]
    per_group = weight.reshape(groups, heads_per_group + 2, head_dim, *rest)
    q = per_group[:, :heads_per_group].reshape(groups * heads_per_group * head_dim, *rest)
    k = per_group[:, heads_per_group].reshape(groups * head_dim, *rest)
    v = per_group[:, heads_per_group + 1].reshape(groups * head_dim, *rest)
    return q, k, v


def _layer(i: int, suffix: str) -> str:
    return f"decoder.layers.{i}.{suffix}"


def _check(core: CoreConfig, full: dict, want: dict[str, object], arch: str) -> None:
    m = core.model
    bad = [f"{k}={getattr(m, k)!r} (needs {v!r})" for k, v in want.items() if getattr(m, k) != v]
    bias = full.get("output_layer.bias")
    if bias is not None and bias.abs().max() > 0:
        bad.append("output_bias: a non-zero output-layer bias has no place in this architecture")
    if bad:
        raise ExportError(f"cannot export as {arch}: " + "; ".join(bad))


def to_gpt2(full: dict, core: CoreConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = core.model
    _check(core, full, {"activation": "gelu", "position_embedding": "learned",
                        "normalization": "LayerNorm"}, "GPT-2")
    if m.query_groups != m.num_attention_heads or m.head_dim * m.num_attention_heads != m.hidden_size:
        raise ExportError("cannot export as GPT-2: it needs multi-head attention with "
                          "head_dim * heads == hidden_size (export the zeroed, not the pruned, model)")
    cfg = GPT2Config(vocab_size=m.vocab_size, n_positions=m.seq_length, n_embd=m.hidden_size,
                     n_layer=m.num_layers, n_head=m.num_attention_heads, n_inner=m.ffn_hidden_size,
                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     layer_norm_epsilon=1e-5, tie_word_embeddings=m.tie_embeddings,
                     bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    h = m.hidden_size
    zeros = torch.zeros
    sd = {"transformer.wte.weight": full["embedding.word_embeddings.weight"],
          "transformer.wpe.weight": full["embedding.position_embeddings.weight"],
          "transformer.ln_f.weight": full["decoder.final_layernorm.weight"],
          "transformer.ln_f.bias": full["decoder.final_layernorm.bias"],
          "lm_head.weight": full.get("output_layer.weight",
                                     full["embedding.word_embeddings.weight"])}
    for i in range(m.num_layers):
        g = lambda s: full.get(_layer(i, s))  # noqa: E731
        q, k, v = split_qkv(g("self_attention.linear_qkv.weight"), m.num_attention_heads, 1, m.head_dim)
        qkv_bias = g("self_attention.linear_qkv.bias")
        qb, kb, vb = (split_qkv(qkv_bias, m.num_attention_heads, 1, m.head_dim)
                      if qkv_bias is not None else (zeros(h),) * 3)
        p = f"transformer.h.{i}."
        sd.update({
            p + "ln_1.weight": g("input_layernorm.weight"), p + "ln_1.bias": g("input_layernorm.bias"),
            p + "ln_2.weight": g("pre_mlp_layernorm.weight"), p + "ln_2.bias": g("pre_mlp_layernorm.bias"),
            p + "attn.c_attn.weight": torch.cat([q, k, v], 0).t(),
            p + "attn.c_attn.bias": torch.cat([qb, kb, vb], 0),
            p + "attn.c_proj.weight": g("self_attention.linear_proj.weight").t(),
            p + "attn.c_proj.bias": _or_zeros(g("self_attention.linear_proj.bias"), h),
            p + "mlp.c_fc.weight": g("mlp.linear_fc1.weight").t(),
            p + "mlp.c_fc.bias": _or_zeros(g("mlp.linear_fc1.bias"), m.ffn_hidden_size),
            p + "mlp.c_proj.weight": g("mlp.linear_fc2.weight").t(),
            p + "mlp.c_proj.bias": _or_zeros(g("mlp.linear_fc2.bias"), h),
        })
    _load(model, sd)
    return model


def _llama_family(core: CoreConfig, full: dict, arch: str) -> dict:
    """Config fields Llama and Mixtral share, after checking the model fits them."""
    m = core.model
    _check(core, full, {"activation": "swiglu", "position_embedding": "rope",
                        "normalization": "RMSNorm"}, arch)
    if m.hidden_size % m.num_attention_heads:
        # transformers validates this even though Llama takes head_dim explicitly.
        raise ExportError(f"cannot export as {arch}: transformers needs hidden_size "
                          f"{m.hidden_size} divisible by the {m.num_attention_heads} heads "
                          "(head_dim mismatch; export the zeroed, not the pruned, model)")
    return dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.query_groups, head_dim=m.head_dim,
                max_position_embeddings=m.seq_length, rms_norm_eps=1e-5,
                rope_theta=float(m.rotary_base), tie_word_embeddings=m.tie_embeddings,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _default_rope(cfg, m) -> None:
    if getattr(cfg, "rope_parameters", None) is not None:
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": float(m.rotary_base)}


def _llama_block(full: dict, m, i: int) -> dict:
    """Block i's norms and attention weights under Llama's (and Mixtral's) names."""
    g = lambda s: full.get(_layer(i, s))  # noqa: E731
    p = f"model.layers.{i}."
    q, k, v = split_qkv(g("self_attention.linear_qkv.weight"), m.query_groups,
                        m.num_attention_heads // m.query_groups, m.head_dim)
    return {p + "input_layernorm.weight": g("input_layernorm.weight"),
            p + "post_attention_layernorm.weight": g("pre_mlp_layernorm.weight"),
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": g("self_attention.linear_proj.weight")}


def _llama_edges(full: dict) -> dict:
    return {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
            "model.norm.weight": full["decoder.final_layernorm.weight"],
            "lm_head.weight": full.get("output_layer.weight",
                                       full["embedding.word_embeddings.weight"])}


def to_llama(full: dict, core: CoreConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = core.model
    hpg = m.num_attention_heads // m.query_groups
    cfg = LlamaConfig(**_llama_family(core, full, "Llama"), intermediate_size=m.ffn_hidden_size,
                      attention_bias=m.add_bias_linear, mlp_bias=m.add_bias_linear)
    _default_rope(cfg, m)
    model = LlamaForCausalLM(cfg).eval()
    sd = _llama_edges(full)
    for i in range(m.num_layers):
        g = lambda s: full.get(_layer(i, s))  # noqa: E731
        p = f"model.layers.{i}."
        gate, up = g("mlp.linear_fc1.weight").chunk(2, 0)
        sd.update(_llama_block(full, m, i))
        sd.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": g("mlp.linear_fc2.weight")})
        if m.add_bias_linear:
            qb, kb, vb = split_qkv(g("self_attention.linear_qkv.bias"), m.query_groups, hpg, m.head_dim)
            gb, ub = g("mlp.linear_fc1.bias").chunk(2, 0)
            sd.update({p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb,
                       p + "self_attn.v_proj.bias": vb,
                       p + "self_attn.o_proj.bias": g("self_attention.linear_proj.bias"),
                       p + "mlp.gate_proj.bias": gb, p + "mlp.up_proj.bias": ub,
                       p + "mlp.down_proj.bias": g("mlp.linear_fc2.bias")})
    _load(model, sd)
    return model


def to_mixtral(full: dict, core: CoreConfig):
    from transformers import MixtralConfig, MixtralForCausalLM

    m, moe = core.model, core.model.moe
    unfit = [why for bad, why in (
        (moe.layer_freq != 1, "every block must be an MoE block (model.moe.layer_freq 1)"),
        (moe.shared_expert, "Mixtral has no shared expert"),
        (moe.score_function != "softmax" or moe.pre_softmax,
         "Mixtral weights the chosen experts by a softmax over their logits (score_function "
         "softmax, pre_softmax false)"),
        (m.add_bias_linear, "Mixtral has no linear biases")) if bad]
    if unfit:
        raise ExportError("cannot export as Mixtral: " + "; ".join(unfit))
    cfg = MixtralConfig(**_llama_family(core, full, "Mixtral"),
                        intermediate_size=moe.expert_width(m.ffn_hidden_size),
                        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                        sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
    _default_rope(cfg, m)
    model = MixtralForCausalLM(cfg).eval()
    sd = _llama_edges(full)
    for i in range(m.num_layers):
        p, experts = f"model.layers.{i}.mlp.", range(moe.num_experts)
        expert = lambda e, s: full[_layer(i, f"mlp.experts.local_experts.{e}.{s}")]  # noqa: E731
        sd.update(_llama_block(full, m, i))
        sd.update({p + "gate.weight": full[_layer(i, "mlp.router.weight")],
                   p + "experts.gate_up_proj": torch.stack(
                       [expert(e, "linear_fc1.weight") for e in experts]),
                   p + "experts.down_proj": torch.stack(
                       [expert(e, "linear_fc2.weight") for e in experts])})
    _load(model, sd)
    return model


def _or_zeros(t, n):
    return t if t is not None else torch.zeros(n)


def _load(model, sd: dict) -> None:
    own = model.state_dict()
    expected = {k for k in own if not k.endswith(".attn.bias") and not k.endswith("masked_bias")}
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing = sorted(expected - set(sd))
    if missing:
        raise ExportError(f"export mapping misses {missing[:5]}")
    with torch.no_grad():
        for name, value in sd.items():
            if own[name].shape != value.shape:
                raise ExportError(f"{name}: shape {tuple(value.shape)} != {tuple(own[name].shape)}")
            own[name].copy_(value.contiguous())
    if model.config.tie_word_embeddings:
        model.tie_weights()


def to_hf(full: dict, core: CoreConfig):
    if core.model.moe is not None:
        return to_mixtral(full, core)
    if core.model.position_embedding == "learned":
        return to_gpt2(full, core)
    return to_llama(full, core)


def export_hf(full: dict, core: CoreConfig, out_dir: Path, tokenizer: Path | None) -> Path:
    """Write ``save_pretrained`` files to ``out_dir`` and, given the run's sentencepiece model,
    a tokenizer ``AutoTokenizer`` loads to the same ids (``hf_tokenizer.py``), with its EOS
    (``<eod>``) and pad ids set in the model and generation configs."""
    from .hf_tokenizer import TokenizerExportError, special_ids, write_hf_tokenizer

    model = to_hf(full, core)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        try:
            ids = special_ids(tokenizer)
            if ids.vocab_size > core.model.vocab_size:
                raise ExportError(f"tokenizer {tokenizer} has {ids.vocab_size} pieces but the "
                                  f"model only {core.model.vocab_size} embeddings")
            write_hf_tokenizer(tokenizer, out_dir, core.model.seq_length)
        except TokenizerExportError as exc:
            raise ExportError(f"tokenizer {tokenizer}: {exc}") from None
        pad = ids.pad_id if ids.pad_id is not None else ids.eos_id
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = ids.eos_id, pad, None
    model.save_pretrained(out_dir)
    return out_dir
