"""Learning-rate schedule and AdamW parameter groups shared by every engine."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine to ``min_lr`` at ``train.steps``.

    ``step`` counts optimizer steps already taken (0 for the first update)."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and norm weights (every 1-D tensor) get no weight decay, as in megatron."""
    return param.dim() == 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def torch_adamw(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """The fused CUDA kernel on GPU (one launch for every tensor); on CPU the per-tensor loop
    (foreach=False), which is bit-reproducible however tensors are grouped, as exact resume
    needs, and costs nothing measurable there."""
    cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr,
                             betas=tuple(train.betas), eps=train.eps,
                             foreach=False, fused=True if cuda else None)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
