"""Optimizer state as dist_checkpointing sharded tensors.

- A megatron-core optimizer (``get_megatron_optimizer``, GPU) shards itself:
  ``sharded_state_dict(model_sd, is_loading)`` / ``load_state_dict``. Any object with those
  two methods is used the same way; that is the hook for other engines.
- A plain ``torch.optim`` optimizer (the CPU path: AdamW over the model's parameters) gets
  one ShardedTensor per per-parameter state tensor (``exp_avg``, ``exp_avg_sq``), with the
  global shape and offsets of the parameter's own ShardedTensor, so it reshards with TP like
  the model. Scalar state (``step``) and the param-group hyperparameters go to the common
  (rank-0) part; they are identical on every rank because all ranks step together.
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
    """{"sharded": {...ShardedTensors}, "common": {...plain values}} for a torch optimizer."""
    id_map = _param_map(optimizer, model_sd)
    sharded: dict[str, Any] = {}
    tensor_keys: dict[int, list[str]] = {}
    scalars: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(_params(optimizer)):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0:
                sharded[f"{i}.{key}"] = _sharded(id_map[i], value, key)
                tensor_keys.setdefault(i, []).append(key)
            else:
                scalars.setdefault(i, {})[key] = value.clone() if torch.is_tensor(value) else value
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} | {
        "num_params": len(g["params"])} for g in optimizer.param_groups]
    return {"sharded": sharded, "common": {"param_groups": groups, "tensor_keys": tensor_keys,
                                           "scalars": scalars}}


def torch_template_for_load(optimizer: torch.optim.Optimizer, model_sd, common: dict) -> dict:
    """ShardedTensors to load into, shaped after this process's parameters."""
    params = _params(optimizer)
    saved_groups = common["param_groups"]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [g["num_params"] for g in saved_groups]
    if ours != theirs:
        raise CheckpointError(f"optimizer parameter groups differ: checkpoint has {theirs} "
                              f"parameters per group, this optimizer {ours}")
    id_map = _param_map(optimizer, model_sd)
    return {f"{i}.{key}": _sharded(id_map[int(i)], torch.empty_like(params[int(i)]), key)
            for i, keys in common["tensor_keys"].items() for key in keys}


def torch_load(optimizer: torch.optim.Optimizer, loaded: dict, common: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in loaded.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = tensor
    for i, values in common["scalars"].items():
        state.setdefault(int(i), {}).update(copy.deepcopy(values))
    groups, start = [], 0
    for ours, saved in zip(optimizer.param_groups, common["param_groups"]):
        group = {k: v for k, v in saved.items() if k != "num_params"}
        group["params"] = list(range(start, start + len(ours["params"])))
        start += len(ours["params"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
