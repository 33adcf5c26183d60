"""Analytic per-GPU memory of a training layout: parameters, gradients, optimizer state and
activations, stage by stage. Pure arithmetic (no torch), so it runs anywhere in milliseconds.

What is counted, per GPU, for megatron-core 0.16.1 as this project builds it:

- **Parameters** exactly from the model shape, for one tensor-parallel rank of one pipeline
  stage. Column-parallel weights (qkv, fc1, output layer, word embeddings) and their biases are
  split over TP; row-parallel weights (proj, fc2) too, their biases and every norm are
  replicated. The first stage holds the embeddings, the last the final norm and the output
  layer; with tied embeddings and PP > 1 the last stage holds its own copy (megatron keeps the
  two in sync by an all-reduce), with PP = 1 the one matrix serves both.
- **States**: weights in the parameter dtype; megatron DDP's fp32 gradient buffer
  (``grad_reduce_in_fp32``); Adam's two fp32 moments plus, for bf16 weights, the fp32 main
  copy. The distributed optimizer shards the optimizer state (not the gradient buffer) over DP.
- **Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models"): the bytes each block saves for backward, from the tensors megatron's
  layers and torch's kernels actually save: 34·s·b·h for a GPT block without the s² attention
  scores, which flash/SDPA attention never stores. Parts TP shards are divided by TP; with
  sequence parallelism everything is. Full recompute keeps only each checkpoint's input plus
  one checkpoint's working set. Each stage holds as many micro-batches as megatron's 1F1B or
  interleaved schedule has in flight there; the last adds the logits and cross-entropy buffers.

MoE blocks (``model.moe``) are counted by ``plan_moe.py``: experts per expert-parallel rank,
routing and expert activations, and the token dispatcher's buffers.

Not modelled (hence the headroom): the CUDA context and NCCL buffers, allocator fragmentation,
transient gradient buffers during backward, and torch.compile, which may save less than the
eager count used here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from . import plan_moe

GIB = 2 ** 30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


class PlanError(ValueError):
    """A configuration the planner cannot model."""


@dataclass(frozen=True)
class Layout:
    """How one training step is laid out on the GPUs."""

    tp: int
    pp: int
    vp: Optional[int]
    sp: bool
    dp: int
    micro_batch: int
    micro_batches: int          # per step on each data-parallel rank
    recompute: str              # none | selective | full
    recompute_num_layers: int
    distributed_optimizer: bool
    params_dtype: str           # bf16 | fp32
    ep: int = 1                 # expert-parallel ranks (carved out of DP)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def chunks(self) -> int:
        return self.vp or 1

    @classmethod
    def of(cls, cfg, gpus: int) -> "Layout":
        """The layout an ``ExperimentConfig`` gets on ``gpus`` GPUs (raises its ConfigError)."""
        dp, accum = cfg.batch_plan(gpus)
        return cls(tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel,
                   vp=cfg.virtual_pipeline_parallel, sp=cfg.sequence_parallel, dp=dp,
                   micro_batch=cfg.train.micro_batch_size, micro_batches=accum,
                   recompute=cfg.model.activation_recompute,
                   recompute_num_layers=cfg.model.recompute_num_layers,
                   distributed_optimizer=cfg.engine.distributed_optimizer,
                   params_dtype=cfg.model.dtype_on(cuda=True), ep=cfg.expert_parallel)


# ------------------------------------------------------------------------------- parameters
def _norm_params(model) -> int:
    return model.hidden_size * (1 if model.normalization == "RMSNorm" else 2)


def _attention_params(model, tp: int) -> int:
    h, d = model.hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.query_groups * d
    bias = model.add_bias_linear
    qkv = (q + 2 * kv) * (h + bias) // tp
    proj = h * q // tp + h * bias                      # row-parallel bias is replicated
    return 2 * _norm_params(model) + qkv + proj


def layer_params(model, tp: int = 1) -> int:
    """Parameters of one dense transformer block on one TP rank."""
    h = model.hidden_size
    fc1_out = model.ffn_hidden_size * (2 if model.activation == "swiglu" else 1)
    bias = model.add_bias_linear
    fc1 = fc1_out * (h + bias) // tp
    fc2 = h * model.ffn_hidden_size // tp + h * bias
    return _attention_params(model, tp) + fc1 + fc2


def is_moe_block(model, layer: int) -> bool:
    return model.moe is not None and model.moe.is_moe_layer(layer)


def block_params(model, layer: int, tp: int = 1, ep: int = 1) -> int:
    """Parameters of block ``layer`` on one GPU (an MoE block holds E / EP experts)."""
    if is_moe_block(model, layer):
        return _attention_params(model, tp) + plan_moe.moe_mlp_params(model, tp, ep)
    return layer_params(model, tp)


def active_block_params(model) -> int:
    """Parameters of all blocks that one token uses (TP = EP = 1): the model's active N."""
    return sum(_attention_params(model, 1) + plan_moe.active_moe_mlp_params(model)
               if is_moe_block(model, i) else layer_params(model)
               for i in range(model.num_layers))


def stage_layers(model, layout: "Layout", stage: int) -> range:
    per_stage = model.num_layers // layout.pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def stage_expert_params(model, layout: "Layout", stage: int) -> int:
    """Routed-expert parameters on one GPU of a stage (their optimizer shards over DP / EP)."""
    return sum(plan_moe.local_expert_params(model, layout.tp, layout.ep)
               for i in stage_layers(model, layout, stage) if is_moe_block(model, i))


def embedding_params(model, tp: int = 1) -> int:
    """Word embeddings (vocab-parallel) and learned positions (replicated): the first stage."""
    positions = model.seq_length * model.hidden_size if model.position_embedding == "learned" else 0
    return model.vocab_size * model.hidden_size // tp + positions


def head_params(model, tp: int = 1, own_output_weight: bool = True) -> int:
    """Final norm and output layer on the last stage. ``own_output_weight`` is false only when
    tied embeddings live on the same stage (PP = 1) and the matrix is shared."""
    weight = model.vocab_size * model.hidden_size // tp if own_output_weight else 0
    bias = model.vocab_size // tp if model.output_bias else 0
    return _norm_params(model) + weight + bias


def model_params(model) -> int:
    """Distinct parameters of the whole model (TP = PP = EP = 1)."""
    return (embedding_params(model) + sum(block_params(model, i) for i in range(model.num_layers))
            + head_params(model, own_output_weight=not model.tie_embeddings))


def stage_params(model, layout: Layout, stage: int) -> int:
    """Parameters one GPU of pipeline stage ``stage`` holds."""
    first, last = stage == 0, stage == layout.pp - 1
    n = sum(block_params(model, i, layout.tp, layout.ep)
            for i in stage_layers(model, layout, stage))
    if first:
        n += embedding_params(model, layout.tp)
    if last:
        n += head_params(model, layout.tp,
                         own_output_weight=not (model.tie_embeddings and first))
    return n


# ------------------------------------------------------------------------------ activations
def layer_activation_terms(model, layout: Layout, layer: int = 0) -> dict[str, int]:
    """Bytes block ``layer`` saves for backward, for one micro-batch on one GPU, without
    recompute (``selective`` drops only flash attention's softmax statistics: it recomputes
    core attention from q, k, v, which stay saved as its inputs)."""
    e = DTYPE_BYTES[layout.params_dtype]
    t, s, b = layout.tp, model.seq_length, layout.micro_batch
    tokens = s * b
    local = tokens // t if layout.sp else tokens     # residual-stream tokens on this rank
    h, d = model.hidden_size, model.head_dim
    q, kv, f = model.num_attention_heads * d // t, model.query_groups * d // t, \
        model.ffn_hidden_size // t
    terms = {
        # LayerNorm/RMSNorm inputs (the residual stream), and their outputs, which qkv and
        # fc1 save as inputs. Statistics are fp32: mean and 1/std, or 1/rms only.
        "norm inputs": 2 * e * local * h,
        "norm statistics": 2 * (4 if model.normalization == "RMSNorm" else 8) * local,
        "qkv and fc1 inputs": 2 * e * local * h,
        # q, k and v are views of qkv's output; the projection reads attention's output,
        # which the attention kernel saves too (one storage).
        "qkv output": e * tokens * (q + 2 * kv),
        "attention output": e * tokens * q,
    }
    if model.position_embedding == "rope":
        # Rotated q and k are new tensors; each rotation saves its cos and sin tables.
        terms["rotary q, k and tables"] = e * tokens * (q + kv) + 4 * e * s * d
    if layout.recompute != "selective":
        terms["softmax statistics"] = 4 * b * (model.num_attention_heads // t) * s
    if is_moe_block(model, layer):
        terms.update(plan_moe.moe_activation_terms(model, layout))
    elif model.activation == "swiglu":
        # Unfused megatron GLU saves fc1's output, silu(gate), a copy of the linear half and
        # their product (fc2's input); with linear biases megatron's fused bias-SwiGLU
        # saves only fc1's output and the product.
        terms["mlp activation"] = (3 if model.add_bias_linear else 5) * e * tokens * f
    else:
        terms["mlp activation"] = 2 * e * tokens * f  # GeLU input, fc2 input
    if model.dropout > 0:
        terms["dropout masks"] = 2 * local * h        # one byte per element, two per block
    return terms


def checkpoint_input_bytes(model, layout: Layout) -> int:
    """What full recompute keeps per checkpoint: the block input (the residual stream)."""
    tokens = model.seq_length * layout.micro_batch
    local = tokens // layout.tp if layout.sp else tokens
    return DTYPE_BYTES[layout.params_dtype] * local * model.hidden_size


def in_flight(layout: Layout, stage: int) -> int:
    """Model-chunk micro-batches whose activations stage ``stage`` holds at its peak, as
    megatron-core's schedules run them: one without pipelining, ``min(PP - stage, m)`` under
    1F1B, and the warm-up depth plus one under the interleaved schedule."""
    m, p = layout.micro_batches, layout.pp
    if p == 1:
        return 1
    if layout.vp is None:
        return min(p - stage, m)
    total = m * layout.vp
    warmup = 2 * (p - stage - 1) + (layout.vp - 1) * p
    return total if warmup >= total else warmup + 1


def _embedding_terms(model, layout: Layout) -> dict[str, int]:
    tokens = model.seq_length * layout.micro_batch
    local = tokens // layout.tp if layout.sp else tokens
    ids = 2 if model.position_embedding == "learned" else 1
    # int64 token (and position) ids; at TP > 1 the vocab-parallel lookup also keeps its
    # out-of-range mask (bool) to zero other ranks' rows.
    terms = {"token and position ids": 8 * tokens * ids + (tokens if layout.tp > 1 else 0)}
    if model.dropout > 0:
        terms["embedding dropout mask"] = local * model.hidden_size
    return terms


def _head_terms(model, layout: Layout) -> dict[str, int]:
    e = DTYPE_BYTES[layout.params_dtype]
    tokens = model.seq_length * layout.micro_batch
    local = tokens // layout.tp if layout.sp else tokens
    vocab = model.vocab_size // layout.tp
    terms = {
        "final norm and output-layer inputs": 2 * e * local * model.hidden_size
        + (4 if model.normalization == "RMSNorm" else 8) * local,
        # The vocab-parallel cross-entropy works on an fp32 copy of the logits and keeps its
        # softmax for backward; target ids (int64) and the vocab-range mask (bool) too.
        "logits (fp32 softmax) and targets": 4 * tokens * vocab + 9 * tokens,
    }
    if e == 2:
        terms["bf16 logits (transient)"] = 2 * tokens * vocab
    return terms


# ----------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class StagePlan:
    stage: int
    layers: int
    params: int
    weights: int
    grads: int
    optimizer: int
    optimizer_unsharded: int
    activations: int            # transformer blocks, all micro-batches in flight
    layer_micro_batches: int    # blocks x micro-batches those activations cover
    extras: int                 # embedding ids, final norm, logits and loss buffers

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.extras


def _optimizer_bytes_per_param(layout: Layout) -> int:
    # Adam's two fp32 moments, plus the fp32 main copy of bf16 weights.
    return 8 + (4 if layout.params_dtype == "bf16" else 0)


def plan_stage(model, layout: Layout, stage: int) -> StagePlan:
    params = stage_params(model, layout, stage)
    per_chunk = model.num_layers // (layout.pp * layout.chunks)
    chunks_alive = in_flight(layout, stage)
    layers = stage_layers(model, layout, stage)
    per_layer = [sum(layer_activation_terms(model, layout, i).values()) for i in layers]
    # Chunks are assumed alike: the stage's mean block stands for each chunk's blocks.
    mean_layer = sum(per_layer) // len(per_layer)
    if layout.recompute == "full":
        n = layout.recompute_num_layers
        kept = chunks_alive * (per_chunk // n) * checkpoint_input_bytes(model, layout)
        activations = kept + n * max(per_layer)  # one checkpoint re-run at a time
    else:
        activations = chunks_alive * per_chunk * mean_layer
    micro_batches_alive = min(chunks_alive, layout.micro_batches)
    extras = 0
    if stage == 0:
        extras += micro_batches_alive * sum(_embedding_terms(model, layout).values())
    if stage == layout.pp - 1:
        # The last stage runs each micro-batch's backward right after its loss (1F1B's
        # steady state), so one set of logits is alive at a time.
        extras += sum(_head_terms(model, layout).values())
    if any(is_moe_block(model, i) for i in layers):
        extras += plan_moe.dispatcher_bytes(model, layout)  # one block's forward at a time
    per_param = _optimizer_bytes_per_param(layout)
    opt_full = per_param * params
    experts = stage_expert_params(model, layout, stage)
    # Routed experts are reduced (and their optimizer sharded) over DP / EP ranks only.
    opt_sharded = math.ceil(per_param * (params - experts) / layout.dp) + \
        math.ceil(per_param * experts / (layout.dp // layout.ep))
    return StagePlan(
        stage=stage, layers=model.num_layers // layout.pp, params=params,
        weights=DTYPE_BYTES[layout.params_dtype] * params, grads=4 * params,
        optimizer=opt_sharded if layout.distributed_optimizer else opt_full,
        optimizer_unsharded=opt_full, activations=activations,
        layer_micro_batches=chunks_alive * per_chunk, extras=extras)


@dataclass(frozen=True)
class Plan:
    layout: Layout
    stages: tuple[StagePlan, ...]
    total_params: int
    gpu_memory_gib: float
    headroom: float

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda st: st.total)

    @property
    def budget(self) -> int:
        return int(self.gpu_memory_gib * GIB * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.budget


def check_layout(model, layout: Layout) -> None:
    """The divisibility the formulas rely on (load_experiment checks the same for a config)."""
    problems = []
    if layout.tp <= 0 or layout.pp <= 0 or layout.dp <= 0:
        problems.append(f"TP {layout.tp}, PP {layout.pp} and DP {layout.dp} must be positive")
    elif model.num_layers % (layout.pp * layout.chunks):
        problems.append(f"{model.num_layers} layers do not split into {layout.pp} stages x "
                        f"{layout.chunks} chunks")
    elif model.query_groups % layout.tp or model.ffn_hidden_size % layout.tp or \
            model.vocab_size % layout.tp:
        problems.append(f"query groups, ffn_hidden_size and vocab_size must divide by TP "
                        f"{layout.tp}")
    elif layout.sp and (layout.tp == 1 or model.seq_length % layout.tp):
        problems.append("sequence parallelism needs TP > 1 dividing seq_length")
    elif layout.recompute == "full" and \
            (model.num_layers // (layout.pp * layout.chunks)) % layout.recompute_num_layers:
        problems.append(f"recompute_num_layers {layout.recompute_num_layers} does not divide "
                        "the layers of a model chunk")
    elif model.moe is not None and (model.moe.num_experts % layout.ep or layout.dp % layout.ep
                                    or plan_moe.expert_width(model) % layout.tp):
        problems.append(f"EP {layout.ep} must divide the {model.moe.num_experts} experts and "
                        f"DP {layout.dp}, and TP {layout.tp} the expert width")
    if problems:
        raise PlanError("; ".join(problems))


def plan_memory(model, layout: Layout, gpu_memory_gib: float = 80.0,
                headroom: float = 0.15) -> Plan:
    check_layout(model, layout)
    stages = tuple(plan_stage(model, layout, r) for r in range(layout.pp))
    return Plan(layout=layout, stages=stages, total_params=model_params(model),
                gpu_memory_gib=gpu_memory_gib, headroom=headroom)


def what_if(model, layout: Layout, gpu_memory_gib: float = 80.0,
            headroom: float = 0.15) -> list[tuple[Layout, Plan]]:
    """The same model and batch under SP off/on (where valid) x every recompute mode x the
    distributed optimizer off/on: the alternatives a user weighs against this layout."""
    out = []
    sps = [False, True] if layout.tp > 1 and model.seq_length % layout.tp == 0 else [False]
    for sp in sps:
        for recompute in ("none", "selective", "full"):
            for dist_opt in (False, True):
                alt = replace(layout, sp=sp, recompute=recompute, distributed_optimizer=dist_opt)
                try:
                    out.append((alt, plan_memory(model, alt, gpu_memory_gib, headroom)))
                except PlanError:
                    continue
    return out


__all__ = ["GIB", "Layout", "Plan", "PlanError", "StagePlan", "active_block_params",
           "block_params", "check_layout", "embedding_params",
           "head_params", "in_flight", "layer_activation_terms", "layer_params", "model_params",
           "plan_memory", "plan_stage", "stage_params", "what_if"]
