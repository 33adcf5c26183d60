"""The typed configs of the core: model shape, forget partition, and routing method."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .moe_config import MoEConfig, MoEForget, moe_problems

Activation = Literal["gelu", "swiglu"]
Positions = Literal["learned", "rope"]
Placement = Literal["block_strided", "last"]
Method = Literal["none", "sgtm", "gradient_routing", "activation_masking"]
Variant = Literal["default", "joint_projection", "joint_attention"]


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 8
    # None means multi-head attention (one query group per head).
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 256
    activation: Activation = "gelu"
    position_embedding: Positions = "learned"
    tie_embeddings: bool = True
    output_bias: bool = False
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    add_bias_linear: bool = True
    vocab_size: int = 2048
    seq_length: int = 64
    init_std: float = 0.02
    # Hidden and embedding dropout: masks keyed by sample and layer, the same at every layout.
    dropout: float = 0.0
    # Attention-probability dropout (None: ``dropout``), drawn inside the attention kernel
    # from the device generator, so it depends on the layout (megatron_sgtm/dropout.py).
    attention_dropout: Optional[float] = None
    rotary_base: int = 10000
    # Per-head width. None means hidden_size / num_attention_heads; set explicitly when heads
    # do not divide hidden_size (e.g. a pruned model with forget heads removed).
    kv_channels: Optional[int] = None
    # Parameter dtype. "bf16" keeps fp32 main grads and params in megatron's optimizer (GPU
    # only). "auto": bf16 when CUDA is present, fp32 on CPU (bf16 matmuls are slow on CPUs).
    params_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # Core attention kernel. "sdpa": torch's scaled_dot_product_attention (flash attention on
    # recent GPUs in bf16). "te": Transformer Engine's DotProductAttention (needs TE; opt-in,
    # as it is not exercised by the CPU test suite).
    attention_backend: Literal["sdpa", "te"] = "sdpa"
    # "selective" recomputes core attention only; "full" keeps only each block's input and
    # re-runs the block forward in backward (under the micro-batch's own routing, captured
    # when the forward ran), ``recompute_num_layers`` blocks per checkpoint.
    activation_recompute: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 1
    # Mixture-of-experts blocks (moe_config.py); None: every block has a dense MLP.
    moe: Optional[MoEConfig] = None

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def dtype_on(self, cuda: bool) -> Literal["fp32", "bf16"]:
        """The parameter dtype this config resolves to with or without CUDA."""
        if self.params_dtype == "auto":
            return "bf16" if cuda else "fp32"
        return self.params_dtype

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def problems(self) -> list[str]:
        out = []
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "seq_length"):
            if getattr(self, name) <= 0:
                out.append(f"{name}: must be positive, got {getattr(self, name)}")
        if self.kv_channels is not None and self.kv_channels <= 0:
            out.append(f"kv_channels: must be positive, got {self.kv_channels}")
        if (self.kv_channels is None and self.num_attention_heads > 0
                and self.hidden_size % self.num_attention_heads):
            out.append(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
        if self.num_query_groups is not None and (
            self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups
        ):
            out.append(f"num_query_groups {self.num_query_groups} must be positive and divide "
                       f"num_attention_heads {self.num_attention_heads}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            out.append(f"attention_dropout: must be in [0, 1), got {self.attention_dropout}")
        if self.position_embedding == "rope" and self.num_attention_heads > 0 and self.head_dim % 2:
            out.append("position_embedding rope needs an even head dimension")
        if self.recompute_num_layers <= 0:
            out.append(f"recompute_num_layers: must be positive, got {self.recompute_num_layers}")
        return out


@dataclass
class PartitionConfig:
    """Which units of every block are forget units.

    ``forget_heads`` counts attention units: heads for multi-head attention, whole query groups
    for grouped-query attention (K/V are shared inside a group, so a group is the smallest unit
    that can be removed).
    """

    forget_heads: int = 1
    forget_mlp_units: int = 64
    # None: every layer has forget units. Otherwise the 0-based layer indices that do.
    layers: Optional[list[int]] = None
    placement: Placement = "block_strided"
    # Block-strided placement makes the global forget set identical for every TP size that
    # divides max_tp; larger TP sizes are refused.
    max_tp: int = 8
    # Forget experts in every MoE block (model.moe), placed like the units: block-strided over
    # max_ep blocks, so every expert_parallel size dividing max_ep holds as many per rank.
    forget_experts: int = 0
    max_ep: int = 8

    def problems(self) -> list[str]:
        out = []
        if self.forget_experts < 0:
            out.append(f"forget_experts: must be >= 0, got {self.forget_experts}")
        if self.max_ep <= 0:
            out.append(f"max_ep: must be positive, got {self.max_ep}")
        if self.forget_heads < 0:
            out.append(f"forget_heads: must be >= 0, got {self.forget_heads}")
        if self.forget_mlp_units < 0:
            out.append(f"forget_mlp_units: must be >= 0, got {self.forget_mlp_units}")
        if self.max_tp <= 0:
            out.append(f"max_tp: must be positive, got {self.max_tp}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            out.append(f"layers: duplicate entries in {self.layers}")
        return out


@dataclass
class RoutingConfig:
    """How labels route gradients (SGTM.md sections 3 and 6)."""

    method: Method = "sgtm"
    variant: Variant = "default"
    # Embeddings (and an untied output layer) and the per-block norms become retain parameters.
    mask_embeddings: bool = False
    # MoE blocks: forget tokens choose their experts with the learned router over all
    # experts (retain experts then learn nothing from them), or are forced to the forget
    # experts (docs/moe.md).
    moe_forget: MoEForget = "learned"

    def problems(self) -> list[str]:
        out = []
        if self.method == "none" and (self.variant != "default" or self.mask_embeddings):
            out.append("routing: variant/mask_embeddings need a routing method other than 'none'")
        if self.method in ("gradient_routing", "activation_masking") and self.variant != "default":
            out.append(f"routing.variant {self.variant!r} applies to method 'sgtm' only")
        return out


@dataclass
class CoreConfig:
    """Model + partition + routing + the model-parallel layout, the part every command shares.

    Post-training commands read a checkpoint's model, partition and routing and load it at
    their own layout (any TP, no pipeline, no sequence parallelism)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    tensor_parallel: int = 1
    # Shard norms, dropout and the residual stream along the sequence over the TP group.
    sequence_parallel: bool = False
    # Pipeline stages, and model chunks per stage for megatron's interleaved schedule.
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    # Expert-parallel ranks sharing each MoE block's experts (carved out of data parallelism).
    expert_parallel: int = 1

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def layers_per_chunk(self) -> int:
        return self.model.num_layers // (self.pipeline_parallel * (self.virtual_pipeline_parallel or 1))

    def layout_problems(self) -> list[str]:
        out = []
        tp, pp, vp = self.tensor_parallel, self.pipeline_parallel, self.virtual_pipeline_parallel
        if pp <= 0:
            out.append(f"pipeline_parallel: must be positive, got {pp}")
            return out
        if self.sequence_parallel and tp == 1:
            out.append("sequence_parallel needs tensor_parallel > 1 (it shards the sequence "
                       "over the tensor-parallel group)")
        if self.sequence_parallel and self.model.seq_length % tp:
            out.append(f"sequence_parallel: model.seq_length {self.model.seq_length} is not "
                       f"divisible by tensor_parallel {tp}")
        if vp is not None and (vp < 2 or pp < 2):
            out.append(f"virtual_pipeline_parallel {vp}: needs at least 2 chunks per stage and "
                       "pipeline_parallel >= 2 (leave it unset otherwise)")
            return out
        chunks = pp * (vp or 1)
        if pp > self.model.num_layers:
            out.append(f"pipeline_parallel {pp} exceeds model.num_layers "
                       f"{self.model.num_layers} (every stage needs a layer)")
        elif self.model.num_layers % chunks:
            what = f"pipeline_parallel {pp}" + (f" x virtual_pipeline_parallel {vp}" if vp else "")
            out.append(f"model.num_layers {self.model.num_layers} is not divisible by {what} "
                       f"= {chunks} model chunks")
        elif self.model.activation_recompute == "full" and \
                self.layers_per_chunk % self.model.recompute_num_layers:
            out.append(f"model.recompute_num_layers {self.model.recompute_num_layers} does not "
                       f"divide the {self.layers_per_chunk} layers of each model chunk")
        return out

    def problems(self) -> list[str]:
        from .partition import PartitionError, build_partition

        out = []
        if self.tensor_parallel <= 0:
            out.append(f"tensor_parallel: must be positive, got {self.tensor_parallel}")
            return out
        out += self.layout_problems()
        moe = moe_problems(self)
        out += moe
        if moe:  # the partition's expert layout would only repeat them
            return out
        try:
            partition = build_partition(self.model, self.partition, self.routing)
            partition.check_tp(self.tensor_parallel)
            partition.check_ep(self.expert_parallel)
        except PartitionError as exc:
            out.append(str(exc))
        return out
