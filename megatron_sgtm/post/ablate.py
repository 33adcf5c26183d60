"""Post-ablation (theta_forget -> exactly 0) and pruning into a smaller dense model.

Zeroing works in place on this rank's shards (megatron_sgtm.ablation). Pruning works on the
full (TP=1) parameter layout: it removes the forget query groups and MLP units, which is exact
because an ablated unit contributes exactly zero (its q/k/v rows and biases are zero, so the
head's output is softmax(.)@0 = 0; its fc1 row and bias are zero and gelu(0) = silu(0) = 0).

MoE blocks lose their forget experts outright (``drop_forget_experts``): the router rows go,
the other experts are renumbered in order, and tokens route among them exactly as the ablated
model (whose removed experts are never chosen) routes them.
"""
from __future__ import annotations

import copy
import re

import torch

from ..ablation import forget_slices, zero_forget_
from ..config import CoreConfig
from ..partition import Partition, build_partition
from ..routing import ablated_roles

__all__ = ["zero_forget_", "max_abs_forget", "prune_full_params", "drop_forget_experts",
           "PruneError"]

# The MoE block's own tensors: router rows per expert, experts as whole units.
_MOE_PARAM = re.compile(r"^(decoder\.layers\.(\d+)\.mlp\.)(router\.(?:weight|bias)|"
                        r"experts\.local_experts\.(\d+)\.(.+)|shared_experts\..+)$")


class PruneError(ValueError):
    """This model cannot be pruned into a dense megatron model that matches exactly."""


@torch.no_grad()
def max_abs_forget(model) -> float:
    """Largest |entry| of theta_forget on this rank's shards (0.0 after ablation)."""
    from ..mcore_moe import max_abs_forget_experts

    worst = max_abs_forget_experts(model)
    for _name, module, _role, units in forget_slices(model):
        index = torch.tensor(units, dtype=torch.long, device=module.weight.device)
        column = _is_column(module)
        worst = max(worst, module.weight.index_select(0 if column else 1, index).abs().max().item())
        if column and module.bias is not None:
            worst = max(worst, module.bias.index_select(0, index).abs().max().item())
    return worst


def _is_column(module) -> bool:
    from ..mcore_layers import SGTMColumnParallelLinear

    return isinstance(module, SGTMColumnParallelLinear)


def _global_indices(part: Partition) -> dict[str, list[int]]:
    """Full-layout forget rows/cols per role (as Partition.local at tp=1)."""
    local = part.local(1, 0)
    return {role: list(local.units(role)) for role in ("qkv", "proj", "fc1", "fc2")}


def _keep(size: int, drop: list[int]) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().squeeze(1)


def pruned_core(core: CoreConfig) -> CoreConfig:
    """The config of the dense model left after removing every forget unit."""
    part = build_partition(core.model, core.partition, core.routing)
    problems = []
    if tuple(part.layers) != tuple(range(core.model.num_layers)):
        problems.append(f"forget units live only in layers {list(part.layers)}; megatron needs "
                        "the same head/unit counts in every layer")
    roles = ablated_roles(core.routing.variant)
    drops_heads = bool(part.forget_groups) and "qkv" in roles
    drops_mlp = bool(part.forget_mlp) and "fc1" in roles
    if not drops_heads and not drops_mlp:
        problems.append("the partition has no ablated units to remove")
    groups_left = part.query_groups - (len(part.forget_groups) if drops_heads else 0)
    units_left = part.mlp_units - (len(part.forget_mlp) if drops_mlp else 0)
    if groups_left <= 0 or units_left <= 0:
        problems.append("pruning would remove every attention group or every MLP unit")
    if problems:
        raise PruneError("cannot prune exactly: " + "; ".join(problems))
    new = copy.deepcopy(core)
    m = new.model
    m.kv_channels = part.head_dim
    m.num_attention_heads = groups_left * part.heads_per_group
    m.num_query_groups = None if core.model.num_query_groups is None else groups_left
    if m.moe is not None:  # experts keep their width when the dense MLP units go
        m.moe.ffn_hidden_size = m.moe.expert_width(m.ffn_hidden_size)
    m.ffn_hidden_size = units_left
    # The pruned model has no forget units; routing is irrelevant for a dense model.
    new.partition.forget_heads = 0
    new.partition.forget_mlp_units = 0
    new.partition.layers = None
    new.routing.method, new.routing.variant, new.routing.mask_embeddings = "none", "default", False
    new.tensor_parallel = 1
    return new


@torch.no_grad()
def prune_full_params(full: dict[str, torch.Tensor], core: CoreConfig
                      ) -> tuple[CoreConfig, dict[str, torch.Tensor]]:
    """Remove forget units from a TP=1-layout parameter dict of an (ablated) model."""
    new_core = pruned_core(core)
    part = build_partition(core.model, core.partition, core.routing)
    drop = _global_indices(part)
    roles = ablated_roles(core.routing.variant)
    if "qkv" not in roles:
        drop["qkv"] = drop["proj"] = []
    # (joint_projection keeps proj/fc2 un-ablated, but their forget columns read only the zero
    # outputs of ablated heads/units, so removing them is exact too.)
    if "fc1" not in roles:
        drop["fc1"] = drop["fc2"] = []
    out = {}
    for name, tensor in full.items():
        role = next((r for r in ("qkv", "proj", "fc1", "fc2") if f"linear_{r}." in name), None)
        if role is None or not drop[role] or _MOE_PARAM.match(name):
            out[name] = tensor.clone()
            continue
        if role in ("qkv", "fc1"):
            out[name] = tensor.index_select(0, _keep(tensor.shape[0], drop[role])).clone()
        elif name.endswith(".weight"):
            out[name] = tensor.index_select(1, _keep(tensor.shape[1], drop[role])).clone()
        else:  # output bias of proj / fc2: kept (SGTM.md section 5)
            out[name] = tensor.clone()
    return new_core, out


@torch.no_grad()
def drop_forget_experts(full: dict[str, torch.Tensor], core: CoreConfig
                        ) -> tuple[CoreConfig, dict[str, torch.Tensor], list[int]]:
    """Remove the forget experts of every MoE block from a full-layout parameter dict:
    (config with ``num_experts - forget_experts`` experts, parameters, removed global ids)."""
    part = build_partition(core.model, core.partition, core.routing)
    if not part.forget_experts:
        return core, dict(full), []
    if part.expert_layers != part.moe_layers:
        raise PruneError(f"forget experts live only in MoE blocks {list(part.expert_layers)} "
                         f"of {list(part.moe_layers)}; megatron needs the same expert count in "
                         "every MoE block")
    keep = [e for e in range(part.num_experts) if e not in part.forget_experts]
    new = copy.deepcopy(core)
    new.model.moe.num_experts = len(keep)
    new.partition.forget_experts = 0
    new.expert_parallel = 1
    out = {}
    for name, tensor in full.items():
        match = _MOE_PARAM.match(name)
        if match is None or match.group(3).startswith("shared_experts"):
            out[name] = tensor.clone()
        elif match.group(4) is None:  # router rows
            out[name] = tensor[keep].clone()
        elif int(match.group(4)) in keep:
            renamed = f"{match.group(1)}experts.local_experts.{keep.index(int(match.group(4)))}."
            out[renamed + match.group(5)] = tensor.clone()
    return new, out, list(part.forget_experts)
