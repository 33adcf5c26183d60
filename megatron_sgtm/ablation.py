"""Post-ablation in place: set theta_forget to exactly zero on this rank's shards.

Which linears hold theta_forget depends on the variant (``routing.ablated_roles``); output
biases and everything outside the blocks stay untouched (SGTM.md section 5). In MoE blocks the
forget experts and their router rows are zeroed and taken out of routing
(``mcore_moe.remove_forget_experts_``).
"""
from __future__ import annotations

import torch

from .mcore_layers import SGTMColumnParallelLinear, SGTMRowParallelLinear
from .mcore_moe import remove_forget_experts_
from .model import _LINEAR_PATH
from .routing import ablated_roles


def forget_slices(model):
    """Yield ``(name, module, role, local_units)`` for every linear holding theta_forget."""
    roles = ablated_roles(model.core.routing.variant)
    for name, module in model.named_modules():
        match = _LINEAR_PATH.search(name)
        if not match:
            continue
        role = match.group(3) or match.group(4)
        if role in roles and module._sgtm_units:
            yield name, module, role, module._sgtm_units


@torch.no_grad()
def zero_forget_(model) -> int:
    """Zero theta_forget in place; returns the number of entries zeroed on this rank.

    Models trained without routing still have the configured partition, so a no-filter
    baseline can be ablated the same way as a control."""
    zeroed = 0
    for _name, module, _role, units in forget_slices(model):
        index = torch.tensor(units, dtype=torch.long, device=module.weight.device)
        if isinstance(module, SGTMColumnParallelLinear):
            module.weight.index_fill_(0, index, 0.0)
            zeroed += index.numel() * module.weight.shape[1]
            if module.bias is not None:
                module.bias.index_fill_(0, index, 0.0)
                zeroed += index.numel()
        elif isinstance(module, SGTMRowParallelLinear):
            module.weight.index_fill_(1, index, 0.0)
            zeroed += index.numel() * module.weight.shape[0]
    return zeroed + remove_forget_experts_(model)
