"""Optimizer state as dist_checkpointing sharded tensors.

- A megatron-core optimizer (``get_megatron_optimizer``, GPU) shards itself:
  ``sharded_state_dict(model_sd, is_loading)`` / ``load_state_dict``. Any object with those
  two methods is used the same way; that is the hook for other engines.
- A plain ``torch.optim`` optimizer (the CPU path: AdamW over the model's parameters) gets
  one ShardedTensor per per-parameter state tensor (``exp_avg``, ``exp_avg_sq``), with the
  global shape and offsets of the parameter's own ShardedTensor, so it reshards with TP like
  the model. The step count and the param-group hyperparameters go to the common (rank-0)
  part; they are identical on every rank and parameter because all step together, so the
  common part fits any layout (TP, PP) the checkpoint is loaded at.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .layout import CheckpointError

OPTIM_PREFIX = "optimizer.state"


def kind(optimizer) -> str:
    if optimizer is None:
        return "none"
    if isinstance(optimizer, torch.optim.Optimizer):
        return "torch"
    if hasattr(optimizer, "sharded_state_dict") and hasattr(optimizer, "load_state_dict"):
        return "sharded"
    raise CheckpointError(f"cannot checkpoint optimizer of type {type(optimizer).__name__}: "
                          "need a torch.optim.Optimizer or an object with "
                          "sharded_state_dict()/load_state_dict()")


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _param_map(optimizer, model_sd) -> dict:
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    params = _params(optimizer)
    id_map = get_param_id_to_sharded_param_map(model_sd, params)
    missing = [i for i in range(len(params)) if i not in id_map]
    if missing:
        raise CheckpointError(f"optimizer holds {len(missing)} parameters that are not in the "
                              "model's sharded state dict (pass the model the optimizer updates)")
    return id_map


def _sharded(model_param, tensor: torch.Tensor, state_key: str):
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    return make_sharded_optimizer_tensor(model_param, tensor, prefix=f"{OPTIM_PREFIX}.{state_key}")


def torch_state_for_save(optimizer: torch.optim.Optimizer, model_sd) -> dict:
    """{"sharded": {...ShardedTensors}, "common": {...plain values}} for a torch optimizer.

    The common part (written by rank 0 only) must describe every rank's parameters, also
    under pipeline parallelism where ranks hold different layers. It therefore holds no
    per-parameter entries: the group hyperparameters, the state keys every parameter
    carries and the step count, which all parameters share because they step together."""
    id_map = _param_map(optimizer, model_sd)
    sharded: dict[str, Any] = {}
    layouts = set()
    step = None
    for i, p in enumerate(_params(optimizer)):
        keys = []
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0:
                sharded[f"{i}.{key}"] = _sharded(id_map[i], value, key)
                keys.append(key)
            elif key == "step":
                step = value.clone() if torch.is_tensor(value) else value
            else:
                raise CheckpointError(f"optimizer state {key!r} is neither a tensor shaped like "
                                      "its parameter nor the step count")
        layouts.add(tuple(sorted(keys)))
    if len(layouts) > 1:
        raise CheckpointError(f"optimizer parameters carry different state keys {sorted(layouts)}; "
                              "all must have stepped together")
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
              for g in optimizer.param_groups]
    return {"sharded": sharded, "common": {
        "param_groups": groups, "tensor_keys": list(layouts.pop()) if layouts else [],
        "step": step}}


def torch_template_for_load(optimizer: torch.optim.Optimizer, model_sd, common: dict) -> dict:
    """ShardedTensors to load into, shaped after this process's parameters."""
    params = _params(optimizer)
    if len(common["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"optimizer has {len(optimizer.param_groups)} parameter groups, "
                              f"the checkpoint {len(common['param_groups'])}")
    id_map = _param_map(optimizer, model_sd)
    return {f"{i}.{key}": _sharded(id_map[i], torch.empty_like(p), key)
            for i, p in enumerate(params) for key in common["tensor_keys"]}


def torch_load(optimizer: torch.optim.Optimizer, loaded: dict, common: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in loaded.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = tensor
    if common["step"] is not None:
        for values in state.values():
            values["step"] = copy.deepcopy(common["step"])
    groups, start = [], 0
    for ours, saved in zip(optimizer.param_groups, common["param_groups"]):
        group = dict(saved)
        group["params"] = list(range(start, start + len(ours["params"])))
        start += len(ours["params"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
