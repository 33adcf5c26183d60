"""Workers for the model-parallel layout proofs (spawned gloo processes).

Every layout trains one optimizer step's worth of micro-batches through the real engine
(megatron DDP, megatron-core's schedules, finalize_model_grads) from the same full (TP=1)
weights, and returns its gradients renamed to global layer numbers and gathered over TP, so
any layout compares entry for entry with the single-process run. The micro-batches carry
deliberately different label mixes, so a stale or wrong routing context would show.
"""
from __future__ import annotations

import re

import torch

FAMILIES = {
    "mha_gelu": ["model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=8",
                 "model.ffn_hidden_size=64", "model.vocab_size=96", "model.seq_length=16",
                 "model.tie_embeddings=true"],
    "gqa_swiglu": ["model.num_layers=4", "model.hidden_size=64",
                   "model.num_attention_heads=16", "model.num_query_groups=8",
                   "model.ffn_hidden_size=64", "model.vocab_size=96", "model.seq_length=16",
                   "model.activation=swiglu", "model.position_embedding=rope",
                   "model.normalization=RMSNorm", "model.tie_embeddings=false",
                   "model.output_bias=true"],
}
# Hidden and embedding dropout on (tests/test_dropout.py); attention dropout stays off, it is
# the kernel's own draw.
FAMILIES["mha_gelu_dropout"] = FAMILIES["mha_gelu"] + ["model.dropout=0.2",
                                                       "model.attention_dropout=0"]
COMMON = ["data.dir=unused", "partition.forget_heads=4", "partition.forget_mlp_units=16",
          "partition.max_tp=4", "train.micro_batch_size=4", "train.global_batch_size=24",
          "model.params_dtype=fp32", "train.seed=3"]
# Per micro-batch, the label of each of its 4 sequences: all forget, all retain-path, mixed
# and ordered, unlabeled, mixed out of order.
MIXES = [[2, 2, 2, 2], [1, 1, 1, 1], [2, 1, 0, 0], [0, 0, 0, 0], [0, 2, 1, 2], [1, 0, 0, 2]]
FORGET_ONLY = [[2, 2, 2, 2]] * 4
# name -> (world size, overrides)
LAYOUTS = {
    "tp1": (1, []),
    "tp1_recompute": (1, ["model.activation_recompute=full"]),
    "tp1_recompute_2": (1, ["model.activation_recompute=full", "model.recompute_num_layers=2"]),
    "pp2": (2, ["pipeline_parallel=2"]),
    "pp2_vp2": (2, ["pipeline_parallel=2", "virtual_pipeline_parallel=2"]),
    "tp2_sp": (2, ["tensor_parallel=2", "sequence_parallel=true"]),
    "pp2_recompute": (2, ["pipeline_parallel=2", "model.activation_recompute=full"]),
    "tp2_sp_recompute": (2, ["tensor_parallel=2", "sequence_parallel=true",
                             "model.activation_recompute=full"]),
    "pp2_vp2_recompute": (2, ["pipeline_parallel=2", "virtual_pipeline_parallel=2",
                              "model.activation_recompute=full"]),
    "tp2_pp2": (4, ["tensor_parallel=2", "pipeline_parallel=2"]),
    "tp2_pp2_sp": (4, ["tensor_parallel=2", "pipeline_parallel=2", "sequence_parallel=true"]),
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def micro_batches(mixes, seq: int = 16, vocab: int = 96, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, labels in enumerate(mixes):
        rows = torch.randint(0, vocab, (len(labels), seq + 1), generator=gen)
        routing = torch.tensor(labels).unsqueeze(1).expand(len(labels), seq).contiguous()
        out.append({"tokens": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous(),
                    "routing_labels": routing, "applied_label": routing.clone(),
                    # Places in a data order (they key the dropout masks), out of sequence.
                    "sample_position": torch.arange(len(labels)) * 7 + 100 * k})
    return out


def experiment(family: str, layout: str, method: str):
    from megatron_sgtm.train.config import load_experiment

    return load_experiment(None, COMMON + FAMILIES[family] + LAYOUTS[layout][1] +
                           [f"data.method={method}"])


def full_state(family: str) -> dict:
    """Deterministic TP=1 weights, with non-trivial norms and biases."""
    from megatron_sgtm.model import build_model

    cfg = experiment(family, "tp1", "none")
    torch.manual_seed(11)
    model = build_model(cfg.core)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _global_names(chunk) -> dict:
    """Local parameter name -> name with the global layer number."""
    numbers = [layer.layer_number - 1 for layer in chunk.decoder.layers]
    out = {}
    for name, _ in chunk.named_parameters():
        match = _LAYER.match(name)
        out[name] = (_LAYER.sub(f"decoder.layers.{numbers[int(match.group(1))]}.", name)
                     if match else name)
    return out


def _step(family: str, layout: str, method: str, full: dict, mixes) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_sgtm.model import build_model_chunks
    from megatron_sgtm.parallel import init_parallel
    from megatron_sgtm.train.batches import InputBuilder
    from megatron_sgtm.train.engine import build_engine
    from megatron_sgtm.train.grads import grad_of
    from megatron_sgtm.train.loop import accumulate_grads
    from tp_utils import shard, unshard

    cfg = experiment(family, layout, method)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_parallel(cfg.tensor_parallel, cfg.train.seed, pipeline_parallel=cfg.pipeline_parallel,
                  virtual_pipeline_parallel=cfg.virtual_pipeline_parallel)
    tp, tp_rank = cfg.tensor_parallel, ps.get_tensor_model_parallel_rank()
    gated = cfg.model.activation == "swiglu"
    chunks = build_model_chunks(cfg.core)
    names = {}
    with torch.no_grad():
        for chunk in chunks:
            mapping = _global_names(chunk)
            for name, param in chunk.named_parameters():
                # The last stage's copy of tied embeddings starts from the embedding itself.
                source = mapping[name] if mapping[name] in full else "embedding.word_embeddings.weight"
                param.copy_(shard(mapping[name], full[source], tp, tp_rank, gated))
                names[id(param)] = mapping[name]
    engine = build_engine(chunks, cfg)
    builder = InputBuilder(cfg, torch.device("cpu"))
    loss = accumulate_grads(engine, builder, micro_batches(mixes), torch.device("cpu"))
    grads = {}
    tp_group = ps.get_tensor_model_parallel_group()
    for chunk in chunks:
        for param in chunk.parameters():
            grad = grad_of(param).detach().clone()
            if tp > 1:
                parts = [torch.empty_like(grad) for _ in range(tp)]
                dist.all_gather(parts, grad.contiguous(), group=tp_group)
                grad = unshard(names[id(param)], parts, gated)
            key = names[id(param)]
            if getattr(param, "shared", False):  # the last stage's copy of tied embeddings
                key = "copy:" + key
            grads[key] = grad
    last = ps.is_pipeline_last_stage()
    return {"loss": float(loss) if last else None, "grads": grads}


def run_layouts(rank, world, layouts, families, method_mixes):
    """Every (layout, family, method, mixes) case on this world size; per rank its results."""
    states = {family: None for family in families}
    out = {}
    for layout in layouts:
        for family in families:
            if states[family] is None:
                states[family] = _full_state_once(family)
            for method, mixes in method_mixes:
                out[(layout, family, method, str(mixes))] = _step(
                    family, layout, method, states[family], mixes)
    return out


def _full_state_once(family):
    from megatron.core import parallel_state as ps

    from megatron_sgtm.parallel import init_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_parallel(1, seed=0)  # a TP=1 group to build the reference weights in
    return full_state(family)


def initial_params(rank, world, layouts, families):
    """Every (layout, family): this rank's freshly built parameters in the TP=1 layout, by
    global name (gathered over TP; the last stage's tied copy as ``copy:`` + its name)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_sgtm.init import global_names
    from megatron_sgtm.model import build_model_chunks
    from megatron_sgtm.parallel import init_parallel
    from tp_utils import unshard

    out = {}
    for layout in layouts:
        for family in families:
            cfg = experiment(family, layout, "sgtm")
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            init_parallel(cfg.tensor_parallel, cfg.train.seed,
                          pipeline_parallel=cfg.pipeline_parallel,
                          virtual_pipeline_parallel=cfg.virtual_pipeline_parallel)
            tp = cfg.tensor_parallel
            params = {}
            for chunk in build_model_chunks(cfg.core, seed=cfg.train.seed):
                names = global_names(chunk)
                for local, param in chunk.named_parameters():
                    value = param.detach()
                    if tp > 1:
                        parts = [torch.empty_like(value) for _ in range(tp)]
                        dist.all_gather(parts, value.contiguous(),
                                        group=ps.get_tensor_model_parallel_group())
                        value = unshard(names[local], parts, cfg.model.activation == "swiglu")
                    key = ("copy:" if getattr(param, "shared", False) else "") + names[local]
                    params[key] = value.clone()
            out[(layout, family)] = params
    return out
