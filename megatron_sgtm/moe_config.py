"""The typed config of mixture-of-experts blocks, and the checks that span MoE and the rest.

``model.moe`` turns the MLP of every ``layer_freq``-th block into megatron-core's MoE layer
(a router, ``num_experts`` routed experts of which each token uses ``top_k``, optionally one
shared expert). ``partition.forget_experts`` of them per MoE block are forget experts,
``expert_parallel`` (top level, beside ``tensor_parallel``) shards the experts over ranks, and
``routing.moe_forget`` picks how forget-labelled tokens are routed (``docs/moe.md``).

Nothing here imports torch: the checks run before any process starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

MoEForget = Literal["learned", "forced"]


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    # Width of every routed expert; None: model.ffn_hidden_size.
    ffn_hidden_size: Optional[int] = None
    # Width of one shared expert that every token passes through; 0: none. It is a retain
    # MLP: forget tokens give it no gradient, and ablation keeps it.
    shared_expert: int = 0
    # Blocks 0, k, 2k, ... are MoE blocks; the others keep the dense MLP (with its forget
    # units). 1: every block.
    layer_freq: int = 1
    # How a token's router logits become the weights of its top_k experts: "softmax" over the
    # chosen k (Mixtral), "softmax" over all experts first with pre_softmax (Qwen-MoE without
    # norm_topk_prob), or "sigmoid" normalised over the chosen k (DeepSeek-V3 without bias).
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    pre_softmax: bool = False
    # Switch-style load-balancing loss (computed per label group, docs/moe.md) and router
    # z-loss coefficients; 0 disables either.
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    # megatron-core's token dispatcher. allgather gathers tokens over the TP x EP group and
    # runs on CPU (gloo) as it is; alltoall needs CUDA streams (GPU only here).
    dispatcher: Literal["allgather", "alltoall"] = "allgather"

    def expert_width(self, dense_width: int) -> int:
        return self.ffn_hidden_size or dense_width

    def is_moe_layer(self, layer: int) -> bool:
        return layer % self.layer_freq == 0

    def problems(self) -> list[str]:
        out = []
        for name in ("num_experts", "top_k", "layer_freq"):
            if getattr(self, name) <= 0:
                out.append(f"{name}: must be positive, got {getattr(self, name)}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            out.append(f"ffn_hidden_size: must be positive, got {self.ffn_hidden_size}")
        if self.shared_expert < 0:
            out.append(f"shared_expert: must be >= 0 (0: none), got {self.shared_expert}")
        if self.top_k > self.num_experts > 0:
            out.append(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.aux_loss_coeff < 0 or self.z_loss_coeff < 0:
            out.append("aux_loss_coeff and z_loss_coeff must be >= 0")
        if self.pre_softmax and self.score_function != "softmax":
            out.append("pre_softmax applies to score_function softmax only")
        if self.top_k == 1 and self.score_function == "softmax" and not self.pre_softmax:
            out.append("top_k 1 with a softmax over the chosen expert weights it 1 whatever the "
                       "logits (the router would learn nothing): set pre_softmax true, or use "
                       "score_function sigmoid")
        return out


def moe_layers(model) -> tuple[int, ...]:
    """0-based indices of the MoE blocks of a ModelConfig (empty without ``model.moe``)."""
    if model.moe is None:
        return ()
    return tuple(i for i in range(model.num_layers) if model.moe.is_moe_layer(i))


def moe_problems(core) -> list[str]:
    """Problems of a CoreConfig that involve MoE (each one sentence, found before any rank
    starts). ``core``: a CoreConfig whose own fields already passed their checks."""
    model, part, routing = core.model, core.partition, core.routing
    ep = core.expert_parallel
    out = []
    if ep <= 0:
        return [f"expert_parallel: must be positive, got {ep}"]
    moe = model.moe
    if moe is None:
        if ep > 1:
            out.append(f"expert_parallel {ep} needs model.moe (a model without experts has "
                       "nothing to shard over expert-parallel ranks)")
        if part.forget_experts:
            out.append(f"partition.forget_experts {part.forget_experts} needs model.moe")
        return out
    experts, forget = moe.num_experts, part.forget_experts
    if forget >= experts:
        out.append(f"partition.forget_experts {forget} must be fewer than model.moe.num_experts "
                   f"{experts}: retain tokens need retain experts to route to")
    elif forget and moe.top_k > experts - forget:
        out.append(f"model.moe.top_k {moe.top_k} exceeds the {experts - forget} retain experts: "
                   "retain-path tokens, and the ablated model, choose their top_k among retain "
                   "experts only")
    if routing.method == "sgtm" and routing.moe_forget == "forced" and 0 < forget < moe.top_k:
        out.append(f"routing.moe_forget forced sends each forget token to its top_k "
                   f"{moe.top_k} among the {forget} forget experts: needs "
                   "partition.forget_experts >= model.moe.top_k (or moe_forget learned)")
    if experts % ep:
        out.append(f"expert_parallel {ep} does not divide model.moe.num_experts {experts}")
    if routing.method in ("gradient_routing", "activation_masking"):
        out.append(f"routing.method {routing.method} is not defined for MoE blocks; "
                   "use sgtm (or none)")
    if routing.variant != "default":
        out.append(f"routing.variant {routing.variant} is not defined for MoE blocks; "
                   "use default")
    if model.add_bias_linear:
        out.append("MoE needs model.add_bias_linear false: megatron-core 0.16.1 trains biased "
                   "experts only under expert parallelism without tensor parallelism, and "
                   "its shared expert has no biases (nor do Mixtral, Qwen-MoE or DeepSeek)")
    if core.tensor_parallel > 1 and not core.sequence_parallel:
        out.append("MoE with tensor_parallel > 1 needs sequence_parallel true (megatron-core's "
                   "MoE layer refuses to train without it)")
    if core.pipeline_parallel > 1 or model.activation_recompute != "none":
        out.append("MoE with pipeline_parallel > 1 or model.activation_recompute is not a "
                   "tested layout yet")
    if moe.dispatcher == "alltoall" and ep == 1:
        out.append("model.moe.dispatcher alltoall needs expert_parallel > 1")
    return out
