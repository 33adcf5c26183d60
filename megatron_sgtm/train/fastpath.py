"""The speed settings a training run resolves at start: parameter dtype and torch.compile.

Both default to the fast choice for the device ("auto" dtype and unset ``train.compile``):
bf16 params and a compiled model with CUDA; fp32 and eager on CPU, where bf16 matmuls are slow
and compiling takes longer than a short run saves.
"""
from __future__ import annotations

import torch

from .config import ExperimentConfig, TrainConfig
from .errors import TrainError


def check_device(cfg: ExperimentConfig, cuda: bool) -> None:
    """Settings that need CUDA (megatron's CUDA optimizers, Transformer Engine) are refused
    without it, and TE attention without TE installed."""
    if cfg.model.attention_backend == "te":
        import importlib.util

        if not cuda or importlib.util.find_spec("transformer_engine") is None:
            raise TrainError("model.attention_backend te needs CUDA and Transformer Engine "
                             "(pip install 'megatron_sgtm[gpu]'); use sdpa without them")
    if cuda:
        return
    if cfg.model.params_dtype == "bf16":
        raise TrainError("model.params_dtype bf16 needs CUDA (megatron's mixed-precision "
                         "optimizer keeps its fp32 main params there); use auto or fp32 on CPU")
    if cfg.engine.distributed_optimizer:
        raise TrainError("engine.distributed_optimizer needs CUDA (megatron's distributed "
                         "optimizer checks for CUDA tensors); turn it off on CPU")
    if cfg.model.moe is not None and cfg.model.moe.dispatcher == "alltoall":
        raise TrainError("model.moe.dispatcher alltoall needs CUDA (megatron's alltoall "
                         "dispatcher runs on CUDA streams); use allgather on CPU")


def compile_model(model: torch.nn.Module, train: TrainConfig, device: torch.device) -> bool:
    """Compile ``model`` in place when the config (or the device default) asks; say if it did.

    In place (``nn.Module.compile``), so megatron DDP, DeepSpeed and checkpoints keep seeing the
    same module with the same parameter names. The routing context is read inside the compiled
    forward as plain bools (see ``routing.py``), so label patterns cost a few graphs, not one
    per step."""
    if not train.compile_on(device.type == "cuda"):
        return False
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if train.compile_backend not in known:
        raise TrainError(f"train.compile_backend {train.compile_backend!r} is not a "
                         f"torch.compile backend; known: {', '.join(sorted(known))}")
    model.compile(backend=train.compile_backend, mode=train.compile_mode)
    return True
