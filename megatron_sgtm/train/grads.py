"""Gradient norms that respect model parallelism, and the forget/retain/joint split of them.

A TP-sharded parameter (``param.tensor_model_parallel``) holds a different slice on every TP
rank, so its squared norm is summed over the TP group. A replicated one (norms, row-layer
biases, position embeddings) holds the same values on every TP rank and is counted on TP rank
0 only. Pipeline stages hold different layers, so squared norms are summed over the whole
model-parallel group (TP x PP); the last stage's copy of tied embeddings (``param.shared``)
is not counted, its gradient being the first stage's. After the data-parallel all-reduce every
DP rank holds the same gradients, so nothing is reduced over DP.

Under expert parallelism the routed experts differ between the EP ranks of one DP group (and
are reduced over the expert-data-parallel group instead): their squared norms are summed over
the expert model-parallel group (expert TP x EP x PP) rather than TP x PP.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from ..routing import ablated_roles

FORGET, RETAIN, JOINT = 0, 1, 2
CATEGORY_NAMES = ("forget", "retain", "joint")

_LINEAR = re.compile(r"decoder\.layers\.(\d+)\.(?:self_attention\.linear_(qkv|proj)|"
                     r"mlp\.linear_(fc1|fc2))\.(weight|bias)$")
_BLOCK_NORM = re.compile(r"decoder\.layers\.\d+\.(input_layernorm|pre_mlp_layernorm)\.")
# MoE blocks: the router's rows are experts; a routed expert is a whole unit.
_MOE = re.compile(r"decoder\.layers\.(\d+)\.mlp\.(router|experts\.local_experts\.(\d+)|"
                  r"shared_experts)\.")


def grad_of(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient the optimizer will use (megatron DDP keeps it in ``main_grad``)."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def counts_here(param: torch.nn.Parameter) -> bool:
    """Whether this rank counts ``param``'s gradient: TP duplicates only on TP rank 0, and the
    pipeline's second copy of tied embeddings nowhere."""
    return param_is_not_tensor_parallel_duplicate(param) and param_is_not_shared(param)


def counted_params(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if counts_here(p)]


def _tp_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over the model-parallel group (TP x PP; just TP without pipeline parallelism)."""
    if parallel_state.get_tensor_model_parallel_world_size() * \
            parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(value, group=parallel_state.get_model_parallel_group())
    return value


def is_expert_parallel(param: torch.nn.Parameter) -> bool:
    """A routed expert's parameter sharded over expert-parallel ranks (megatron marks them
    ``allreduce=False`` when EP > 1: they are reduced over expert data parallelism)."""
    return not getattr(param, "allreduce", True)


def _model_sum(dense: torch.Tensor, expert: Optional[torch.Tensor]) -> torch.Tensor:
    """Dense squared norms summed over TP x PP, expert-parallel ones over expert TP x EP x PP."""
    dense = _tp_sum(dense)
    if expert is None:
        return dense
    group = parallel_state.get_expert_tensor_model_pipeline_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(expert, group=group)
    return dense + expert


def _squared_sum(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm([g.float() for g in grads], 2.0)).square().sum()


def total_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm over the whole model, as a 0-d tensor (no host sync)."""
    counted = counted_params(params)
    device = params[0].device
    dense = _squared_sum([g for p in counted if not is_expert_parallel(p)
                          if (g := grad_of(p)) is not None], device)
    experts = [p for p in counted if is_expert_parallel(p)]
    expert = _squared_sum([g for p in experts if (g := grad_of(p)) is not None], device) \
        if experts or parallel_state.get_expert_model_parallel_world_size() > 1 else None
    return _model_sum(dense, expert).sqrt()


def clip_grads(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale every gradient so the TP-global norm is at most ``max_norm``; return the norm.

    The scale stays a tensor (clamped coefficient), so no host sync happens here."""
    norm = total_grad_norm(params)
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = [g for g in (grad_of(p) for p in params) if g is not None]
        if grads:
            torch._foreach_mul_(grads, coef)
    return norm


@dataclass
class _Entry:
    param: torch.nn.Parameter
    category: int  # category of the whole tensor, or of its non-forget part
    forget_dim: int = 0
    forget_index: Optional[torch.Tensor] = None
    expert_parallel: bool = False


class PartitionNorms:
    """Gradient norm of theta_forget, theta_retain and theta_joint (SGTM.md section 2).

    Built once from this rank's model chunks and its partition's local (this TP rank's)
    forget units."""

    def __init__(self, chunks, routing) -> None:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        partition = chunks[0].partition
        local = partition.local(tp, rank)
        forget_roles = ablated_roles(routing.variant)
        masked_edges = RETAIN if routing.mask_embeddings else JOINT
        self.experts_per_rank = partition.num_experts // max(
            1, parallel_state.get_expert_model_parallel_world_size())
        self.ep_rank = parallel_state.get_expert_model_parallel_rank()
        self.entries: list[_Entry] = []
        for chunk in chunks:
            self._add_chunk(chunk, partition, local, forget_roles, masked_edges)

    def _add_chunk(self, chunk, partition, local, forget_roles, masked_edges) -> None:
        global_layer = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        for name, param in chunk.named_parameters():
            if not counts_here(param):
                continue
            moe = _MOE.search(name)
            if moe:
                self.entries.append(self._moe_entry(param, partition,
                                                    global_layer[int(moe.group(1))], moe))
                continue
            match = _LINEAR.search(name)
            if match:
                layer = global_layer[int(match.group(1))]
                role = match.group(2) or match.group(3)
                kind = match.group(4)
                if role not in forget_roles:
                    self.entries.append(_Entry(param, JOINT))
                    continue
                units = local.units(role) if partition.has_forget_units(layer) else ()
                is_row = role in ("proj", "fc2")
                if is_row and kind == "bias":
                    # Output biases are retain parameters (SGTM.md section 2).
                    self.entries.append(_Entry(param, RETAIN))
                    continue
                index = torch.tensor(units, dtype=torch.long, device=param.device) if units else None
                self.entries.append(_Entry(param, RETAIN, 1 if (is_row and kind == "weight") else 0,
                                           index))
            elif _BLOCK_NORM.search(name) or name.startswith("embedding."):
                self.entries.append(_Entry(param, masked_edges))
            elif name.startswith("output_layer.weight"):
                self.entries.append(_Entry(param, masked_edges))
            else:  # final norm, output bias
                self.entries.append(_Entry(param, JOINT))

    def _moe_entry(self, param, partition, layer: int, match) -> _Entry:
        """Router rows of forget experts and the forget experts themselves are theta_forget;
        the rest of an MoE block (retain experts, retain rows, a shared expert) theta_retain."""
        forget = partition.forget_experts if partition.has_forget_experts(layer) else ()
        expert_parallel = is_expert_parallel(param)
        if match.group(2) == "router":
            index = torch.tensor(forget, dtype=torch.long, device=param.device) if forget else None
            return _Entry(param, RETAIN, 0, index)
        if match.group(3) is not None:
            expert = self.ep_rank * self.experts_per_rank + int(match.group(3))
            return _Entry(param, FORGET if expert in forget else RETAIN,
                          expert_parallel=expert_parallel)
        return _Entry(param, RETAIN)

    def squared(self) -> torch.Tensor:
        """``[3]`` squared norms (forget, retain, joint), model-parallel-reduced (experts over
        expert parallelism too), still on the device."""
        device = self.entries[0].param.device if self.entries else torch.device("cpu")
        dense = torch.zeros(3, dtype=torch.float32, device=device)
        expert = torch.zeros(3, dtype=torch.float32, device=device)
        for entry in self.entries:
            grad = grad_of(entry.param)
            if grad is None:
                continue
            out = expert if entry.expert_parallel else dense
            total = grad.float().square().sum()
            if entry.forget_index is not None:
                part = grad.index_select(entry.forget_dim, entry.forget_index).float().square().sum()
                out[FORGET] += part
                out[entry.category] += total - part
            else:
                out[entry.category] += total
        ep = parallel_state.get_expert_model_parallel_world_size()
        return _model_sum(dense, expert if ep > 1 else None)

    def norms(self) -> dict[str, float]:
        values = self.squared().clamp(min=0).sqrt().tolist()
        return {f"grad_norm/{n}": v for n, v in zip(CATEGORY_NAMES, values)}
