"""Build a megatron-core ``GPTModel`` whose blocks carry SGTM routing.

The layer spec is megatron's local one with five swaps: the SGTM linears, ``RoutedNorm``, a
torch SDPA core attention (TE attention when Transformer Engine is installed and asked for)
and a bias-dropout-add whose masks are keyed by sample and layer (``dropout.py``). After
construction every parameter gets its layout-free initial value (``init.py``), and
``bind_routing`` tells every linear its role, layer and local forget units.
MoE blocks (``model.moe``) take their MLP spec and routing rules from ``mcore_moe.py``
(the hook is ``_mlp_spec`` / ``_bind_mlp`` below).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlock,
                                                        TransformerBlockSubmodules,
                                                        get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (TransformerLayer,
                                                        TransformerLayerSubmodules,
                                                        get_transformer_layer_offset)

from .config import CoreConfig, ModelConfig
from . import mcore_moe
from .cpu_shims import apply_cpu_shims
from .dropout import KeyedBiasDropoutAdd, bind_dropout
from .init import ExpertLayout, initialize_chunks, resolve_seed
from .mcore_layers import (
    RoutedNorm,
    SDPACoreAttention,
    SGTMColumnParallelLinear,
    SGTMRowParallelLinear,
    drop_forget_grads_hook,
    install_routed_recompute,
)
from .partition import Partition, build_partition
from .routing import LinearRule, linear_rule

_LINEAR_PATH = re.compile(r"decoder\.layers\.(\d+)\.(self_attention\.linear_(qkv|proj)|mlp\.linear_(fc1|fc2))$")


def transformer_config(model: ModelConfig, tp: int, *, use_gpu: bool,
                       sequence_parallel: bool = False, pipeline_parallel: int = 1,
                       virtual_pipeline_parallel: int | None = None,
                       expert_parallel: int = 1) -> TransformerConfig:
    swiglu = model.activation == "swiglu"
    bf16 = model.dtype_on(use_gpu) == "bf16"
    full_recompute = model.activation_recompute == "full"
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
        attention_dropout=model.dropout if model.attention_dropout is None
        else model.attention_dropout,
        init_method_std=model.init_std,
        tensor_model_parallel_size=tp,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=not use_gpu,
        perform_initialization=True,
        # The SGTM wgrad mask replaces megatron's GEMM; the fused accumulation would skip it.
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Individual isend/irecv, ordered by even/odd stage (megatron's non-batched path). In
        # one batched call two transfers between the same pair of ranks can be matched the
        # wrong way round (with two stages, next and previous are the same rank, and the
        # interleaved schedule sends both ways at once): equal shapes, silently swapped.
        batch_p2p_comm=False,
        bias_activation_fusion=use_gpu and model.add_bias_linear,
        bias_dropout_fusion=use_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        recompute_granularity=None if model.activation_recompute == "none"
        else model.activation_recompute,
        recompute_method="uniform" if full_recompute else None,
        recompute_num_layers=model.recompute_num_layers if full_recompute else None,
        **mcore_moe.transformer_kwargs(model, expert_parallel),
    )


def _mlp_spec(model: ModelConfig | None, layer: int) -> ModuleSpec:
    """The MLP of global block ``layer``: megatron's MoE layer in MoE blocks, else the dense
    MLP with SGTM linears."""
    if model is not None and model.moe is not None and model.moe.is_moe_layer(layer):
        return mcore_moe.layer_mlp_spec(model)
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=SGTMColumnParallelLinear, linear_fc2=SGTMRowParallelLinear))


def layer_spec(attention_backend: str = "sdpa", model: ModelConfig | None = None,
               layer: int = 0) -> ModuleSpec:
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
            self_attn_bda=KeyedBiasDropoutAdd,
            pre_mlp_layernorm=RoutedNorm,
            mlp=_mlp_spec(model, layer),
            mlp_bda=KeyedBiasDropoutAdd,
        ),
    )


def block_spec(config: TransformerConfig, attention_backend: str = "sdpa",
               vp_stage: int | None = None, model: ModelConfig | None = None) -> ModuleSpec:
    """The decoder block: this pipeline chunk's layers, and a ``RoutedNorm`` as the final norm
    (never masked: it is joint), which unlike megatron's torch-norm wrapper supports sequence
    parallelism."""
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    layers = [layer_spec(attention_backend, model, offset + i) for i in range(count)]
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=layers, layer_norm=RoutedNorm))


class SGTMGPTModel(GPTModel):
    """GPTModel whose output layer is routable (and may carry a bias)."""

    def __init__(self, config: TransformerConfig, core: CoreConfig, **kwargs):
        self._sgtm_output_ready = False
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
        self._sgtm_output_ready = True
        self.setup_embeddings_and_output_layer()

    def setup_embeddings_and_output_layer(self) -> None:
        """Megatron's set-up of the embedding and output layer, for our output layer.

        GPTModel calls it from its constructor, before our output layer exists, so it runs
        once afterwards. With tied embeddings split over pipeline stages, the last stage's
        copy of the word embeddings is marked as megatron marks it (finalize_model_grads
        sums the two copies' gradients every step); its initial value is the embedding's
        own, drawn from the same stream (``init.py``), so no collective is needed, where
        megatron zeroes the copy and all-reduces it from the first stage. Unlike megatron's
        version it moves nothing to CUDA, so it also runs on CPU."""
        if not self._sgtm_output_ready:
            return
        if self.pre_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        if not self.share_embeddings_and_output_weights:
            return
        weight = self.shared_embedding_or_output_weight()
        if self.config.pipeline_model_parallel_size == 1:
            weight.zero_out_wgrad = True
            return
        if self.pre_process and not self.post_process:
            weight.shared_embedding = True
        if self.post_process and not self.pre_process:
            weight.shared, weight.shared_embedding = True, True


def decoder_layers(model: SGTMGPTModel):
    """``(global layer index, TransformerLayer)`` for this chunk's layers (megatron numbers
    layers from 1 across all pipeline stages)."""
    for layer in model.decoder.layers:
        yield layer.layer_number - 1, layer


def _bind_mlp(layer, index: int, partition: Partition, core: CoreConfig) -> dict:
    """Bind an MoE block's MLP here (its rules are mcore_moe's); a dense MLP's two linears are
    returned to be bound with the attention's."""
    if mcore_moe.is_moe(layer):
        mcore_moe.bind_moe_layer(layer.mlp, index, partition, core.routing,
                                 parallel_state.get_expert_model_parallel_world_size(),
                                 parallel_state.get_expert_model_parallel_rank())
        return {}
    return {"fc1": layer.mlp.linear_fc1, "fc2": layer.mlp.linear_fc2}


def bind_routing(model: SGTMGPTModel, partition: Partition, core: CoreConfig,
                 tp: int, tp_rank: int) -> None:
    """Give every routable module its rule and local forget units (by global layer index)."""
    method, variant = core.routing.method, core.routing.variant
    local = partition.local(tp, tp_rank)
    for index, layer in decoder_layers(model):
        linears = {"qkv": layer.self_attention.linear_qkv, "proj": layer.self_attention.linear_proj,
                   **_bind_mlp(layer, index, partition, core)}
        for role, module in linears.items():
            units = local.units(role) if partition.has_forget_units(index) else ()
            module.bind(linear_rule(method, variant, role), units)
        layer.input_layernorm.masked = core.routing.mask_embeddings
        layer.pre_mlp_layernorm.masked = core.routing.mask_embeddings
    if core.routing.mask_embeddings and method != "none":
        if model.pre_process:
            model.embedding.register_forward_hook(drop_forget_grads_hook)
        if model.post_process:
            # The output layer is an embedding too (tied or not): retain under mask-embeddings;
            # its bias stays joint. No forget rows: forget tokens update none of it.
            model.output_layer.bind(LinearRule(masked_wgrad=True), (), mask_bias=False)


def _check_groups(core: CoreConfig) -> tuple[int, int]:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    if (tp, pp, ep) != (core.tensor_parallel, core.pipeline_parallel, core.expert_parallel):
        raise ValueError(f"config says tensor_parallel={core.tensor_parallel}, "
                         f"pipeline_parallel={core.pipeline_parallel}, expert_parallel="
                         f"{core.expert_parallel} but the process groups have {tp}, {pp} and "
                         f"{ep} ranks")
    return tp, pp


def _expert_layout(core: CoreConfig) -> ExpertLayout:
    if core.model.moe is None:
        return ExpertLayout()
    return ExpertLayout(parallel_state.get_expert_model_parallel_rank(),
                        parallel_state.get_expert_tensor_parallel_world_size(),
                        parallel_state.get_expert_tensor_parallel_rank())


def build_model_chunks(core: CoreConfig, seed: int | None = None) -> list[SGTMGPTModel]:
    """This process's model chunks: its pipeline stage's layers, split into one chunk per
    virtual stage under the interleaved schedule (a single chunk otherwise). The first
    stage's first chunk holds the embedding, the last stage's last chunk the output layer.
    ``parallel_state`` must be initialised.

    Initial weights are a function of ``seed`` and each parameter's global name and shape
    only (``init.py``): every layout of the same config starts from the same model. Without
    a seed, one is drawn from torch's default generator."""
    use_gpu = torch.cuda.is_available()
    if not use_gpu:
        apply_cpu_shims()
    tp, pp = _check_groups(core)
    if core.model.activation_recompute != "none":
        install_routed_recompute()
    partition = build_partition(core.model, core.partition, core.routing)
    partition.check_tp(tp)
    partition.check_ep(core.expert_parallel)
    vp = core.virtual_pipeline_parallel
    seed = resolve_seed(seed)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = transformer_config(core.model, tp, use_gpu=use_gpu,
                                sequence_parallel=core.sequence_parallel, pipeline_parallel=pp,
                                virtual_pipeline_parallel=vp, expert_parallel=core.expert_parallel)
    chunks = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        model = SGTMGPTModel(
            config=config, core=core,
            transformer_layer_spec=block_spec(config, core.model.attention_backend, vp_stage,
                                              core.model),
            vocab_size=core.model.vocab_size, max_sequence_length=core.model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                                vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=vp_stage),
            share_embeddings_and_output_weights=core.model.tie_embeddings,
            position_embedding_type="rope" if core.model.position_embedding == "rope"
            else "learned_absolute",
            rotary_base=core.model.rotary_base, parallel_output=True, vp_stage=vp_stage)
        initialize_chunks([model], seed, core.model.init_std, core.model.num_layers, tp, tp_rank,
                          _expert_layout(core))
        bind_dropout(model, seed)
        bind_routing(model, partition, core, tp, tp_rank)
        model.partition = partition
        if config.bf16:
            # params_dtype reaches only the layers that read it; position embeddings and the
            # final norm are created in fp32, and an fp32 position embedding would turn every
            # block's input back to fp32. Megatron's training wraps the model in Float16Module,
            # which casts all of it; so do we (the optimizer keeps the fp32 main copies).
            model.bfloat16()
        if use_gpu:
            model.cuda()
        chunks.append(model)
    return chunks


def build_model(core: CoreConfig, seed: int | None = None) -> SGTMGPTModel:
    """The SGTM GPT for this process's TP rank, without pipeline parallelism."""
    if core.pipeline_parallel != 1:
        raise ValueError("build_model builds a whole model; use build_model_chunks for "
                         "pipeline parallelism")
    return build_model_chunks(core, seed)[0]
