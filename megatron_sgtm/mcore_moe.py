"""SGTM inside megatron-core's MoE layer. The MoE-specific use of megatron internals lives here
(``mcore_layers.py`` holds the rest); the rule itself is written down in ``docs/moe.md``.

megatron-core's ``MoELayer`` is used as it is (its token dispatchers, expert-parallel groups,
``SequentialMLP`` parameter layout and sharded checkpoints), with two modules of ours:

- ``SGTMRouter`` (a ``TopKRouter``): per token, the experts a label may use (retain-path
  tokens: retain experts only; forget tokens under ``routing.moe_forget: forced``: forget
  experts only; ablated experts: nobody), the top-k choice among them, the load-balancing loss
  per label group, and, under ``moe_forget: learned``, a router weight gradient in which forget
  tokens reach only the forget experts' rows.
- ``SGTMExperts`` (a ``SequentialMLP``): under ``moe_forget: learned`` a forget token may reach
  a retain expert; the expert's forward is normal, but its parameters learn nothing from that
  token (its rows run on frozen copies of the weights, so the input gradient is unchanged).

How the expert knows a row's label: the router flips the sign of a forget token's routing
weights (``-0.0`` included) and the expert flips it back. The weights travel with the tokens
through every dispatcher and collective, so the label reaches the expert on any EP rank with
no extra communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from . import routing as routing_mod
from .routing import FORGET, RETAIN, linear_rule


def transformer_kwargs(model, expert_parallel: int) -> dict:
    """The TransformerConfig fields of ``model.moe`` (empty for a dense model)."""
    moe = model.moe
    if moe is None:
        return {}
    return dict(
        num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.expert_width(model.ffn_hidden_size),
        moe_shared_expert_intermediate_size=moe.shared_expert or None,
        moe_router_score_function=moe.score_function, moe_router_pre_softmax=moe.pre_softmax,
        moe_aux_loss_coeff=moe.aux_loss_coeff, moe_router_load_balancing_type="aux_loss",
        moe_z_loss_coeff=moe.z_loss_coeff or None, moe_token_dispatcher_type=moe.dispatcher,
        moe_router_dtype="fp32", moe_grouped_gemm=False, moe_permute_fusion=False,
        expert_model_parallel_size=expert_parallel)


def layer_mlp_spec(model) -> ModuleSpec:
    """The MoE block's MLP: megatron's MoELayer with our router and experts. Routed experts
    use megatron's plain linears (no per-unit masks: experts are whole units); a shared
    expert uses the SGTM linears, bound with no forget units (a retain MLP)."""
    from .mcore_layers import SGTMColumnParallelLinear, SGTMRowParallelLinear

    shared = None
    if model.moe.shared_expert:
        shared = ModuleSpec(module=SharedExpertMLP,
                            submodules=MLPSubmodules(linear_fc1=SGTMColumnParallelLinear,
                                                     linear_fc2=SGTMRowParallelLinear))
    experts = ModuleSpec(module=SGTMExperts, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(
        experts=experts, shared_experts=shared, router=SGTMRouter))


def is_moe(layer) -> bool:
    return isinstance(layer.mlp, MoELayer)


class SGTMRouter(TopKRouter):
    """Top-k routing under the micro-batch's labels (see the module docstring).

    Bound by ``bind_moe_layer``: ``forget_experts`` (global ids in this block), ``sgtm``
    (the routing method masks), ``forced`` (moe_forget), ``removed`` (ablated experts)."""

    forget_experts: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    sgtm: bool = False
    forced: bool = False

    def _expert_flags(self, ids, device) -> torch.Tensor:
        """[E] bool, True at ``ids``; built once per id set and device (no per-step copy)."""
        cache = self.__dict__.setdefault("_flag_cache", {})
        key = (tuple(ids), str(device))
        if key not in cache:
            flags = torch.zeros(self.num_experts, dtype=torch.bool)
            flags[list(ids)] = True
            cache[key] = flags.to(device)
        return cache[key]

    def _labels(self, positions: int, device):
        """(forget, retain) flags per token in megatron's [s, b] order, or (None, None)."""
        routing = routing_mod.current()
        if routing is None or not self.sgtm or not self.forget_experts:
            return None, None
        routing = routing.for_length(positions)  # this rank's slice under sequence parallelism
        forget = routing.token_flags(FORGET, device).view(-1) if routing.has_forget else None
        retain = routing.token_flags(RETAIN, device).view(-1) if routing.has_retain else None
        return forget, retain

    def _gating(self, x, forget) -> torch.Tensor:
        """Router logits in fp32. Under learned forget routing, a forget token's logits of
        retain experts come from detached weights: they train only the forget rows, while
        the input gradient (two GEMMs instead of one) is unchanged."""
        dtype = torch.float32 if self.config.moe_router_dtype == "fp32" else x.dtype
        x = x.to(dtype)
        weight = self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        logits = F.linear(x, weight, bias)
        if forget is None or self.forced:
            return logits
        frozen = F.linear(x, weight.detach(), None if bias is None else bias.detach())
        retain_experts = ~self._expert_flags(self.forget_experts, x.device)
        block = forget.view(*x.shape[:-1], 1) & retain_experts
        return torch.where(block, frozen, logits)

    def _blocked(self, forget, retain, tokens: int, device):
        """[tokens, E] bool: the experts each token may not use, or None."""
        blocked = None
        if self.removed:
            blocked = self._expert_flags(self.removed, device).expand(tokens, -1)
            if forget is not None and self.forced:
                raise RuntimeError("an ablated MoE cannot force forget tokens to its removed "
                                   "forget experts")
        if forget is None and retain is None:
            return blocked
        is_forget = self._expert_flags(self.forget_experts, device)
        parts = [] if blocked is None else [blocked]
        if retain is not None:
            parts.append(retain[:, None] & is_forget)
        if forget is not None and self.forced:
            parts.append(forget[:, None] & ~is_forget)
        if not parts:
            return None
        out = parts[0]
        for part in parts[1:]:
            out = out | part
        return out

    def _weights(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Combination weights of the chosen experts ([T, k]) under the score function."""
        if self.score_function == "sigmoid":
            scores = torch.sigmoid(logits.gather(1, chosen))
            return scores / (scores.sum(-1, keepdim=True) + 1e-20) if self.topk > 1 else scores
        if self.config.moe_router_pre_softmax:
            return torch.softmax(logits, dim=-1).gather(1, chosen)
        return torch.softmax(logits.gather(1, chosen), dim=-1)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Every expert's score, as the load-balancing loss uses them (0 where blocked)."""
        if self.score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            return scores / (scores.sum(-1, keepdim=True) + 1e-20)
        return torch.softmax(logits, dim=-1)

    def _load_balancing(self, probs, logits, chosen_map, forget):
        """megatron's Switch load-balancing loss, computed per label group (non-forget tokens,
        forget tokens), each over its own token counts, weighted by its share of the tokens:
        with no forget tokens it is exactly megatron's loss, and a forget token's routing never
        enters the loss of any other token. Counts are summed over the TP x CP group in one
        all-reduce, as megatron's loss does."""
        coeff = self.config.moe_aux_loss_coeff
        if not coeff or not (self.training and torch.is_grad_enabled()):
            return probs
        groups = (torch.ones(1, logits.shape[0], device=logits.device) if forget is None
                  else torch.stack([~forget, forget]).float())
        g, e = groups.shape[0], self.num_experts
        with torch.no_grad():
            counts = torch.cat([(groups @ chosen_map.float()).flatten(), groups.sum(1)])
            if self.tp_cp_group.size() > 1:
                dist.all_reduce(counts, group=self.tp_cp_group)
        per_expert, tokens = counts[:g * e].view(g, e), counts[g * e:]
        score_sums = groups @ self._scores(logits)  # [g, E], local tokens, differentiable
        scale = coeff * e / (self.topk * tokens.sum() * tokens.clamp(min=1))
        aux = ((score_sums * per_expert).sum(1) * scale).sum()
        return MoEAuxLossAutoScaler.apply(probs, aux)

    def forward(self, input: torch.Tensor, padding_mask=None):
        if padding_mask is not None:
            raise NotImplementedError("padding masks are not used by this model")
        seq, batch = input.shape[:2]
        tokens = seq * batch
        forget, retain = self._labels(seq, input.device)
        logits = self._gating(input, forget).view(tokens, self.num_experts)
        blocked = self._blocked(forget, retain, tokens, input.device)
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        logits = self.apply_z_loss(logits)
        # Top-k on the logits themselves (both score functions are monotone): a blocked
        # expert (-inf) is never chosen, even where a score would underflow to a tie at 0.
        chosen = torch.topk(logits, self.topk, dim=1).indices
        weights = self._weights(logits, chosen)
        rows = torch.arange(tokens, device=logits.device).unsqueeze(1).expand_as(chosen)
        # index_put saves only the indices for backward (a one-hot product would save [T, k, E]).
        probs = torch.zeros_like(logits, dtype=weights.dtype).index_put((rows, chosen), weights)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).index_put(
            (rows, chosen), torch.ones_like(chosen, dtype=torch.bool))
        probs = self._load_balancing(probs, logits, routing_map, forget)
        if forget is not None and not self.forced:
            probs = torch.where(forget[:, None], -probs, probs)  # the label, for the experts
        return probs, routing_map


class SGTMExperts(SequentialMLP):
    """megatron's SequentialMLP, whose retain experts learn nothing from forget tokens.

    Bound by ``bind_moe_layer``: ``decode`` (routing weights carry forget labels as their
    sign) and ``retain_local`` (per local expert: a retain expert)."""

    decode: bool = False
    retain_local: tuple[bool, ...] = ()

    def forward(self, hidden, tokens_per_expert, probs):
        if not self.decode:
            return super().forward(hidden, tokens_per_expert, probs)
        forget = torch.signbit(probs)
        probs = torch.where(forget, -probs, probs)
        if not any(self.retain_local) or not bool(forget.any()):
            return super().forward(hidden, tokens_per_expert, probs)
        counts = tokens_per_expert.tolist()
        outputs = []
        for expert, x, p, f, retain in zip(self.local_experts, hidden.split(counts),
                                           probs.split(counts), forget.split(counts),
                                           self.retain_local):
            outputs.append(_frozen_for_forget_rows(expert, x, p, f) if retain
                           else expert(x, p)[0])
        return torch.cat(outputs), None


def _frozen_for_forget_rows(expert, x, probs, forget) -> torch.Tensor:
    """``expert(x, probs)`` whose parameters get no gradient from the ``forget`` rows: those
    rows run megatron's same MLP forward on detached weights (its frozen-weight linear path),
    so their outputs and input gradients are the expert's own."""
    forget_rows = forget.nonzero().squeeze(1)
    if forget_rows.numel() == 0:
        return expert(x, probs)[0]
    kept_rows = (~forget).nonzero().squeeze(1)
    frozen = {name: p.detach() for name, p in expert.named_parameters()}
    kept_out = expert(x.index_select(0, kept_rows), probs.index_select(0, kept_rows))[0]
    forget_out = torch.func.functional_call(
        expert, frozen, (x.index_select(0, forget_rows),),
        {"per_token_scale": probs.index_select(0, forget_rows)})[0]
    out = kept_out.new_zeros((x.shape[0],) + tuple(kept_out.shape[1:]))
    return out.index_copy(0, kept_rows, kept_out).index_copy(0, forget_rows, forget_out)


def bind_moe_layer(mlp: MoELayer, layer: int, partition, routing, ep: int, ep_rank: int) -> None:
    """Give one MoE block its rules: the router's forget experts and mode, each local expert's
    role, the shared expert's SGTM linears (a retain MLP: no forget units)."""
    sgtm = routing.method == "sgtm"
    forget = partition.forget_experts if partition.has_forget_experts(layer) else ()
    router = mlp.router
    router.forget_experts, router.sgtm = tuple(forget), sgtm
    router.forced, router.removed = routing.moe_forget == "forced", ()
    local_forget = partition.local_forget_experts(ep, ep_rank) if forget else ()
    experts = mlp.experts
    experts.retain_local = tuple(i not in local_forget for i in range(experts.num_local_experts))
    experts.decode = sgtm and bool(forget) and not router.forced
    if mlp.shared_experts is not None:
        for role in ("fc1", "fc2"):
            getattr(mlp.shared_experts, f"linear_{role}").bind(
                linear_rule(routing.method, routing.variant, role), ())


@torch.no_grad()
def moe_layers_of(model):
    """``(global layer index, MoELayer)`` for this chunk's MoE blocks."""
    for layer in model.decoder.layers:
        if is_moe(layer):
            yield layer.layer_number - 1, layer.mlp


@torch.no_grad()
def remove_forget_experts_(model) -> int:
    """Post-ablation of the experts in place: zero the forget experts' parameters and router
    rows on this rank, and take them out of routing for every token (a zeroed expert with
    logit 0 would still be chosen). Returns the number of entries zeroed."""
    zeroed = 0
    for _layer, mlp in moe_layers_of(model):
        router = mlp.router
        if not router.forget_experts:
            continue
        ids = torch.tensor(router.forget_experts, dtype=torch.long, device=router.weight.device)
        router.weight.index_fill_(0, ids, 0.0)
        zeroed += ids.numel() * router.weight.shape[1]
        if router.bias is not None:
            router.bias.index_fill_(0, ids, 0.0)
            zeroed += ids.numel()
        for expert, retain in zip(mlp.experts.local_experts, mlp.experts.retain_local):
            if not retain:
                for p in expert.parameters():
                    p.zero_()
                    zeroed += p.numel()
        router.removed = tuple(router.forget_experts)
        mlp.experts.decode = False
    return zeroed


@torch.no_grad()
def max_abs_forget_experts(model) -> float:
    """Largest |entry| of the forget experts and their router rows on this rank."""
    worst = 0.0
    for _layer, mlp in moe_layers_of(model):
        router = mlp.router
        if not router.forget_experts:
            continue
        rows = router.weight[list(router.forget_experts)]
        worst = max(worst, rows.abs().max().item())
        for expert, retain in zip(mlp.experts.local_experts, mlp.experts.retain_local):
            if not retain:
                worst = max([worst] + [p.abs().max().item() for p in expert.parameters()])
    return worst
