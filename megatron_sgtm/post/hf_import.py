"""Load a Hugging Face safetensors export as this project's model: the safe way to share one.

A directory written by ``sgtm ablate --export hf`` (or any GPT-2 / Llama model in the exact
layout ``export_hf.py`` writes) is read from ``config.json`` (JSON), ``model.safetensors``
(or its ``.index.json`` shards: a JSON header plus raw bytes) and ``tokenizer.model``
(protobuf). Nothing on this path unpickles: pickle weight files (``pytorch_model.bin``) are
refused, never read. ``sgtm eval``, ``attack`` and ``rmu`` take such a directory wherever
they take a checkpoint.

``sgtm_export.json``, written next to the export, records the exact core config (partition
and routing method included, so ``--ablate yes`` still knows theta_forget), the step, and the
sha256 of every exported file; the files it lists are verified before loading. Without it
(a model from elsewhere) the model config is derived from ``config.json`` and the routing
method is ``none``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch

from ..config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig
from ..moe_config import MoEConfig
from ..configbase import ConfigError, config_from_dict, config_to_dict
from .ckpt_io import PostError, post_hoc_model

RECORD_FILE = "sgtm_export.json"
RECORD_VERSION = 1
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def is_hf_export(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PostError(f"{path}: unreadable ({exc})") from None
    if not isinstance(value, dict):
        raise PostError(f"{path}: not a JSON object")
    return value


def _sha256(path: Path) -> str:
    from ..checkpoint.integrity import sha256_file

    return sha256_file(path)


# ---------------------------------------------------------------- record (written at export)


def write_record(out_dir: Path, core: CoreConfig, meta: dict) -> None:
    """``sgtm_export.json`` for an export directory whose files are all written."""
    from ..checkpoint.integrity import digests, list_files
    from ..checkpoint.layout import atomic_write_text

    out_dir = Path(out_dir)
    names = list_files(out_dir, exclude={RECORD_FILE})
    extra = meta.get("extra") or {}
    record = {"format_version": RECORD_VERSION, "core": config_to_dict(core),
              "step": int(meta.get("step", 0)), "manifest": extra.get("manifest") or {},
              "files": digests(out_dir, names)}
    atomic_write_text(out_dir / RECORD_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")


def _checked_record(path: Path) -> Optional[dict]:
    if not (path / RECORD_FILE).is_file():
        return None
    record = _json(path / RECORD_FILE)
    if record.get("format_version") != RECORD_VERSION or not isinstance(record.get("files"), dict):
        raise PostError(f"{path / RECORD_FILE}: not a format-{RECORD_VERSION} export record")
    for name, want in sorted(record["files"].items()):
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise PostError(f"{path / RECORD_FILE}: lists {name!r}, which is outside the export")
        if not file.is_file():
            raise PostError(f"{file}: missing (listed in {RECORD_FILE})")
        if file.stat().st_size != want.get("bytes") or _sha256(file) != want.get("sha256"):
            raise PostError(f"{file}: sha256 differs from the one recorded in {RECORD_FILE}: the "
                            "file changed after the export (corruption or tampering); nothing "
                            "was loaded")
    return record


# ---------------------------------------------------------------- config.json -> ModelConfig


def _need(cfg: dict, key: str, want, path: Path) -> None:
    if cfg.get(key, want) != want:
        raise PostError(f"{path}: {key}={cfg.get(key)!r} has no exact equivalent here "
                        f"(needs {want!r})")


def _gpt2_model(cfg: dict, path: Path) -> ModelConfig:
    _need(cfg, "activation_function", "gelu", path)  # gelu_new is tanh-approximate
    _need(cfg, "layer_norm_epsilon", 1e-5, path)
    h = cfg["n_embd"]
    return ModelConfig(num_layers=cfg["n_layer"], hidden_size=h,
                       num_attention_heads=cfg["n_head"],
                       ffn_hidden_size=cfg.get("n_inner") or 4 * h, vocab_size=cfg["vocab_size"],
                       seq_length=cfg["n_positions"],
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                       activation="gelu", position_embedding="learned", normalization="LayerNorm",
                       add_bias_linear=True, output_bias=False)


def _llama_model(cfg: dict, path: Path) -> ModelConfig:
    _need(cfg, "hidden_act", "silu", path)
    _need(cfg, "rms_norm_eps", 1e-5, path)
    _need(cfg, "rope_scaling", None, path)
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default" or theta != int(theta):
        raise PostError(f"{path}: rope {rope or theta} has no exact equivalent here")
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    bias = bool(cfg.get("attention_bias", False))
    if bool(cfg.get("mlp_bias", False)) != bias:
        raise PostError(f"{path}: attention_bias and mlp_bias differ; here both are one switch")
    return ModelConfig(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                       num_attention_heads=heads,
                       num_query_groups=None if groups == heads else groups,
                       ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                       seq_length=cfg["max_position_embeddings"],
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                       activation="swiglu", position_embedding="rope", normalization="RMSNorm",
                       add_bias_linear=bias, output_bias=False, rotary_base=int(theta),
                       kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads)


def _mixtral_model(cfg: dict, path: Path) -> ModelConfig:
    """Mixtral: Llama's attention and norms, every MLP a softmax-top-k MoE block."""
    _need(cfg, "router_jitter_noise", 0.0, path)
    _need(cfg, "sliding_window", None, path)
    model = _llama_model(dict(cfg, attention_bias=False, mlp_bias=False), path)
    model.moe = MoEConfig(num_experts=cfg["num_local_experts"],
                          top_k=cfg["num_experts_per_tok"])
    return model


def model_from_hf_config(cfg: dict, path: Path) -> ModelConfig:
    kind = cfg.get("model_type")
    try:
        if kind == "gpt2":
            return _gpt2_model(cfg, path)
        if kind == "llama":
            return _llama_model(cfg, path)
        if kind == "mixtral":
            return _mixtral_model(cfg, path)
    except KeyError as exc:
        raise PostError(f"{path}: config.json lacks {exc}") from None
    raise PostError(f"{path}: model_type {kind!r} is not one this project exports "
                    "(gpt2, llama, mixtral)")


def _core(path: Path, hf_cfg: dict, record: Optional[dict], tp: int) -> CoreConfig:
    if record is not None:
        raw = copy.deepcopy(record["core"])
    else:
        model = model_from_hf_config(hf_cfg, path / "config.json")
        raw = {"model": config_to_dict(model),
               "partition": config_to_dict(PartitionConfig(forget_heads=0, forget_mlp_units=0)),
               "routing": config_to_dict(RoutingConfig(method="none"))}
    raw["tensor_parallel"] = tp
    post_hoc_model(raw.setdefault("model", {}))
    try:
        core = config_from_dict(CoreConfig, raw)
    except ConfigError as exc:
        raise PostError(f"{path}: its model is not usable at tensor_parallel={tp}: {exc}") from None
    problems = core.problems()
    if problems:
        raise PostError(f"{path}: {'; '.join(problems)}")
    return core


# ---------------------------------------------------------------- weights


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the export (one file or an index of shards); never unpickles."""
    from safetensors import safe_open

    if (path / INDEX).is_file():
        weight_map = _json(path / INDEX).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        what = (f"only pickle weights ({', '.join(pickled)}), which can run code when loaded "
                "and are never read here; re-save them with safetensors "
                "(save_pretrained(..., safe_serialization=True))") if pickled else "no weights"
        raise PostError(f"{path}: holds {what}")
    out = {}
    for name in files:
        if "/" in name or not (path / name).is_file():
            raise PostError(f"{path / INDEX}: names {name!r}, which is not a file here")
        try:
            with safe_open(str(path / name), framework="pt", device="cpu") as f:
                out.update({key: f.get_tensor(key) for key in f.keys()})
        except Exception as exc:
            raise PostError(f"{path / name}: not a safetensors file ({exc})") from None
    return out


def merge_qkv(q, k, v, groups: int, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """(q, k, v) in head order -> megatron's per-group ``[q x hpg, k, v]`` rows."""
    rest = q.shape[1:]
    parts = [q.reshape(groups, heads_per_group, head_dim, *rest),
             k.reshape(groups, 1, head_dim, *rest), v.reshape(groups, 1, head_dim, *rest)]
    return torch.cat(parts, 1).reshape(groups * (heads_per_group + 2) * head_dim, *rest)


def _no_bias(hf: dict, names: list[str], path: Path) -> None:
    for name in names:
        if name in hf and hf[name].abs().max() > 0:
            raise PostError(f"{path}: {name} is non-zero but the model has no linear biases")


def _from_gpt2(hf: dict, m: ModelConfig, path: Path) -> dict:
    h = m.hidden_size
    full = {"embedding.word_embeddings.weight": hf["transformer.wte.weight"],
            "embedding.position_embeddings.weight": hf["transformer.wpe.weight"],
            "decoder.final_layernorm.weight": hf["transformer.ln_f.weight"],
            "decoder.final_layernorm.bias": hf["transformer.ln_f.bias"]}
    for i in range(m.num_layers):
        p, d = f"transformer.h.{i}.", f"decoder.layers.{i}."
        q, k, v = hf[p + "attn.c_attn.weight"].t().split(h, 0)
        full.update({
            d + "input_layernorm.weight": hf[p + "ln_1.weight"],
            d + "input_layernorm.bias": hf[p + "ln_1.bias"],
            d + "pre_mlp_layernorm.weight": hf[p + "ln_2.weight"],
            d + "pre_mlp_layernorm.bias": hf[p + "ln_2.bias"],
            d + "self_attention.linear_qkv.weight": merge_qkv(q, k, v, m.num_attention_heads, 1,
                                                              m.head_dim),
            d + "self_attention.linear_proj.weight": hf[p + "attn.c_proj.weight"].t(),
            d + "mlp.linear_fc1.weight": hf[p + "mlp.c_fc.weight"].t(),
            d + "mlp.linear_fc2.weight": hf[p + "mlp.c_proj.weight"].t()})
        biases = {d + "self_attention.linear_proj.bias": p + "attn.c_proj.bias",
                  d + "mlp.linear_fc1.bias": p + "mlp.c_fc.bias",
                  d + "mlp.linear_fc2.bias": p + "mlp.c_proj.bias"}
        if m.add_bias_linear:
            qb, kb, vb = hf[p + "attn.c_attn.bias"].split(h, 0)
            full[d + "self_attention.linear_qkv.bias"] = merge_qkv(
                qb, kb, vb, m.num_attention_heads, 1, m.head_dim)
            full.update({ours: hf[theirs] for ours, theirs in biases.items()})
        else:
            _no_bias(hf, [p + "attn.c_attn.bias", *biases.values()], path)
    return full


def _llama_edges(hf: dict) -> dict:
    return {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
            "decoder.final_layernorm.weight": hf["model.norm.weight"]}


def _llama_attention(hf: dict, m: ModelConfig, i: int, kind: str = "weight") -> dict:
    """Block i's norms (with ``kind`` weight) and attention ``kind`` tensors."""
    p, d, a = f"model.layers.{i}.", f"decoder.layers.{i}.", f"model.layers.{i}.self_attn."
    out = {f"{d}self_attention.linear_qkv.{kind}": merge_qkv(
               hf[f"{a}q_proj.{kind}"], hf[f"{a}k_proj.{kind}"], hf[f"{a}v_proj.{kind}"],
               m.query_groups, m.num_attention_heads // m.query_groups, m.head_dim),
           f"{d}self_attention.linear_proj.{kind}": hf[f"{a}o_proj.{kind}"]}
    if kind == "weight":
        out.update({d + "input_layernorm.weight": hf[p + "input_layernorm.weight"],
                    d + "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"]})
    return out


def _from_llama(hf: dict, m: ModelConfig, path: Path) -> dict:
    full = _llama_edges(hf)
    for i in range(m.num_layers):
        d, mlp = f"decoder.layers.{i}.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias") if m.add_bias_linear else ("weight",):
            full.update(_llama_attention(hf, m, i, kind))
            full.update({
                f"{d}mlp.linear_fc1.{kind}": torch.cat([hf[f"{mlp}gate_proj.{kind}"],
                                                       hf[f"{mlp}up_proj.{kind}"]], 0),
                f"{d}mlp.linear_fc2.{kind}": hf[f"{mlp}down_proj.{kind}"]})
    return full


def _from_mixtral(hf: dict, m: ModelConfig, path: Path) -> dict:
    """Mixtral as ``save_pretrained`` writes it: per expert ``w1`` (gate), ``w3`` (up),
    ``w2`` (down), and the router ``gate``."""
    full = _llama_edges(hf)
    for i in range(m.num_layers):
        d, moe = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        full.update(_llama_attention(hf, m, i))
        full[d + "router.weight"] = hf[moe + "gate.weight"]
        for e in range(m.moe.num_experts):
            w = lambda n: hf[f"{moe}experts.{e}.{n}.weight"]  # noqa: E731
            full[f"{d}experts.local_experts.{e}.linear_fc1.weight"] = torch.cat([w("w1"), w("w3")])
            full[f"{d}experts.local_experts.{e}.linear_fc2.weight"] = w("w2")
    return full


def full_params(hf: dict, core: CoreConfig, path: Path) -> dict[str, torch.Tensor]:
    """HF tensors -> the TP=1 megatron parameter layout (the inverse of ``export_hf``)."""
    m = core.model
    try:
        convert = (_from_mixtral if m.moe is not None else
                   _from_gpt2 if m.position_embedding == "learned" else _from_llama)
        full = convert(hf, m, path)
    except KeyError as exc:
        raise PostError(f"{path}: the weights lack {exc} for this architecture") from None
    embed = full["embedding.word_embeddings.weight"]
    if not m.tie_embeddings:
        full["output_layer.weight"] = hf.get("lm_head.weight", embed)
    if m.output_bias:  # an export carries no output bias: it was zero (export_hf checks)
        full["output_layer.bias"] = torch.zeros(m.vocab_size, dtype=embed.dtype)
    return {k: v.float() for k, v in full.items()}


# ---------------------------------------------------------------- the loader


def _shape_keys(ours: ModelConfig, theirs: ModelConfig):
    """(key, record's value, config.json's value) for what both must agree on."""
    keys = ["num_layers", "hidden_size", "num_attention_heads", "vocab_size", "activation",
            "position_embedding", "tie_embeddings"]
    out = [(k, getattr(ours, k), getattr(theirs, k)) for k in keys]
    if ours.moe is None or theirs.moe is None:
        out.append(("ffn_hidden_size", ours.ffn_hidden_size, theirs.ffn_hidden_size))
        out.append(("moe", ours.moe is not None, theirs.moe is not None))
        return out
    return out + [("moe.expert width", ours.moe.expert_width(ours.ffn_hidden_size),
                   theirs.moe.expert_width(theirs.ffn_hidden_size)),
                  ("moe.num_experts", ours.moe.num_experts, theirs.moe.num_experts),
                  ("moe.top_k", ours.moe.top_k, theirs.moe.top_k)]


def load(path: Path, tensor_parallel: int):
    """(model, core, metadata) like ``ckpt_io.load``; parallel_state must be set up."""
    from ..model import build_model
    from ..partition import build_partition
    from .layout import load_full_params

    path = Path(path)
    record = _checked_record(path)
    hf_cfg = _json(path / "config.json")
    core = _core(path, hf_cfg, record, tensor_parallel)
    if record is not None:  # the record's core must describe the weights config.json names
        derived = model_from_hf_config(hf_cfg, path / "config.json")
        for key, ours, theirs in _shape_keys(core.model, derived):
            if ours != theirs:
                raise PostError(f"{path}: {RECORD_FILE} says model.{key}={ours!r}, "
                                f"config.json {theirs!r}")
    full = full_params(read_safetensors(path), core, path)
    model = build_model(core)
    try:
        load_full_params(model, full)
    except ValueError as exc:
        raise PostError(f"{path}: weights do not fit the model its config describes: "
                        f"{exc}") from None
    manifest = dict((record or {}).get("manifest") or {})
    if (path / "tokenizer.model").is_file():  # the tokenizer that ships is the one that counts
        manifest["tokenizer_sha256"] = _sha256(path / "tokenizer.model")
    partition = build_partition(core.model, core.partition, core.routing).to_metadata()
    meta = {"format": "hf", "config": config_to_dict(core), "partition": partition,
            "step": int((record or {}).get("step", 0)), "extra": {"manifest": manifest}}
    return model, core, meta
