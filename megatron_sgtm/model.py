"""Build a megatron-core ``GPTModel`` whose blocks carry SGTM routing.

The layer spec is megatron's local one with four swaps: the SGTM linears, ``RoutedNorm`` and
a torch SDPA core attention (TE attention when Transformer Engine is installed and asked for).
After construction, ``bind_routing`` tells every linear its role, layer and local forget units.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlock,
                                                        TransformerBlockSubmodules,
                                                        get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .config import CoreConfig, ModelConfig
from .cpu_shims import apply_cpu_shims
from .mcore_layers import (
    RoutedNorm,
    SDPACoreAttention,
    SGTMColumnParallelLinear,
    SGTMRowParallelLinear,
    drop_forget_grads_hook,
)
from .partition import Partition, build_partition
from .routing import linear_rule

_LINEAR_PATH = re.compile(r"decoder\.layers\.(\d+)\.(self_attention\.linear_(qkv|proj)|mlp\.linear_(fc1|fc2))$")
_NORM_PATH = re.compile(r"decoder\.layers\.(\d+)\.(input_layernorm|pre_mlp_layernorm)$")


def transformer_config(model: ModelConfig, tp: int, *, use_gpu: bool,
                       sequence_parallel: bool = False) -> TransformerConfig:
    swiglu = model.activation == "swiglu"
    bf16 = model.dtype_on(use_gpu) == "bf16"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        normalization=model.normalization,
        add_bias_linear=model.add_bias_linear,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        init_method_std=model.init_std,
        tensor_model_parallel_size=tp,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=not use_gpu,
        perform_initialization=True,
        # The SGTM wgrad mask replaces megatron's GEMM; the fused accumulation would skip it.
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
        bias_activation_fusion=use_gpu and model.add_bias_linear,
        bias_dropout_fusion=use_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        recompute_granularity="selective" if model.activation_recompute == "selective" else None,
    )


def layer_spec(attention_backend: str = "sdpa") -> ModuleSpec:
    core_attention = SDPACoreAttention
    if attention_backend == "te":
        import importlib.util

        if importlib.util.find_spec("transformer_engine") is None:
            raise ValueError("model.attention_backend te needs Transformer Engine "
                             "(pip install 'megatron_sgtm[gpu]'); use sdpa without it")
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        core_attention = TEDotProductAttention
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RoutedNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=SGTMColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=SGTMRowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RoutedNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=SGTMColumnParallelLinear, linear_fc2=SGTMRowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(config: TransformerConfig, attention_backend: str = "sdpa",
               vp_stage: int | None = None) -> ModuleSpec:
    """The decoder block: this pipeline chunk's layers, and a ``RoutedNorm`` as the final norm
    (never masked: it is joint), which unlike megatron's torch-norm wrapper supports sequence
    parallelism."""
    layer = layer_spec(attention_backend)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer] * count, layer_norm=RoutedNorm))


class SGTMGPTModel(GPTModel):
    """GPTModel whose output layer is routable (and may carry a bias)."""

    def __init__(self, config: TransformerConfig, core: CoreConfig, **kwargs):
        super().__init__(config=config, **kwargs)
        self.core = core
        if self.post_process:
            # Same construction as GPTModel's output layer, as a routable class, with an
            # optional bias (joint: it learns from every token).
            tied = self.share_embeddings_and_output_weights
            self.output_layer = SGTMColumnParallelLinear(
                config.hidden_size, self.vocab_size, config=config,
                init_method=config.init_method, bias=core.model.output_bias,
                skip_bias_add=False, gather_output=not self.parallel_output,
                skip_weight_param_allocation=self.pre_process and tied,
                tp_group=self.pg_collection.tp)
            if core.model.output_bias:
                with torch.no_grad():
                    self.output_layer.bias.zero_()


def bind_routing(model: SGTMGPTModel, partition: Partition, core: CoreConfig,
                 tp: int, tp_rank: int) -> None:
    """Give every routable module its rule and local forget units (layer from the module path)."""
    method, variant = core.routing.method, core.routing.variant
    local = partition.local(tp, tp_rank)
    for name, module in model.named_modules():
        match = _LINEAR_PATH.search(name)
        if match:
            layer = int(match.group(1))
            role = match.group(3) or match.group(4)
            units = local.units(role) if partition.has_forget_units(layer) else ()
            module.bind(linear_rule(method, variant, role), units)
        elif _NORM_PATH.search(name):
            module.masked = core.routing.mask_embeddings
    if core.routing.mask_embeddings and method != "none":
        if model.pre_process:
            model.embedding.register_forward_hook(drop_forget_grads_hook)
        if model.post_process:
            # The output layer is an embedding too (tied or not): retain under mask-embeddings;
            # its bias stays joint. No forget rows: forget tokens update none of it.
            from .routing import LinearRule

            model.output_layer.bind(LinearRule(masked_wgrad=True), (), mask_bias=False)


def build_model(core: CoreConfig) -> SGTMGPTModel:
    """The SGTM GPT for this process's TP rank. ``parallel_state`` must be initialised."""
    use_gpu = torch.cuda.is_available()
    if not use_gpu:
        apply_cpu_shims()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != core.tensor_parallel:
        raise ValueError(f"config says tensor_parallel={core.tensor_parallel} but the process "
                         f"group has {tp} ranks")
    partition = build_partition(core.model, core.partition, core.routing)
    partition.check_tp(tp)
    config = transformer_config(core.model, tp, use_gpu=use_gpu,
                                sequence_parallel=core.sequence_parallel)
    model = SGTMGPTModel(
        config=config, core=core,
        transformer_layer_spec=block_spec(config, core.model.attention_backend),
        vocab_size=core.model.vocab_size, max_sequence_length=core.model.seq_length,
        pre_process=True, post_process=True,
        share_embeddings_and_output_weights=core.model.tie_embeddings,
        position_embedding_type="rope" if core.model.position_embedding == "rope" else "learned_absolute",
        rotary_base=core.model.rotary_base, parallel_output=True)
    bind_routing(model, partition, core, tp, parallel_state.get_tensor_model_parallel_rank())
    model.partition = partition
    if config.bf16:
        # params_dtype reaches only the layers that read it; position embeddings and the
        # final norm are created in fp32, and an fp32 position embedding would turn every
        # block's input back to fp32. Megatron's training wraps the model in Float16Module,
        # which casts all of it; so do we (the optimizer keeps the fp32 main copies).
        model.bfloat16()
    if use_gpu:
        model.cuda()
    return model
