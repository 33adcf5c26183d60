"""Logit calibration for evaluation (SGTM.md section 5): train only a fresh output-logit bias.

The model is frozen, so its logits are computed once per batch under no_grad and reused; the
bias (this rank's vocabulary shard) is the only tensor the optimizer sees. Loss:
``l_forget + alpha * l_retain (+ beta * l_adjacent)``, each a token-weighted mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .common import batches, frozen, logits, loss_from_logits


@dataclass
class CalibrationConfig:
    steps: int = 300
    lr: float = 1e-2
    alpha: float = 100.0
    beta: float = 100.0
    weight_decay: float = 0.0

    def problems(self) -> list[str]:
        out = []
        if self.steps <= 0:
            out.append(f"calibration.steps: must be positive, got {self.steps}")
        if self.lr <= 0:
            out.append(f"calibration.lr: must be positive, got {self.lr}")
        if self.alpha < 0 or self.beta < 0:
            out.append("calibration.alpha/beta: must be >= 0")
        return out


@torch.no_grad()
def _cached_logits(model, items: Iterable) -> list[tuple]:
    cached = []
    for b in batches(items):
        cached.append((logits(model, b.tokens).detach().float(), b.targets, b.mask()))
    if not cached:
        raise ValueError("calibration needs at least one batch per split")
    return cached


def _split_loss(cached: list[tuple], step: int, bias: torch.Tensor) -> torch.Tensor:
    vp, targets, mask = cached[step % len(cached)]
    loss = loss_from_logits(vp, targets, bias)
    mask = mask.to(loss.device)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def calibrate_output_bias(model, forget: Iterable, retain: Iterable,
                          adjacent: Optional[Iterable] = None,
                          cfg: CalibrationConfig = CalibrationConfig()) -> torch.Tensor:
    """Train and return the calibrated bias (vocab shard ``[vocab/tp]``, no grad)."""
    if cfg.problems():
        raise ValueError("; ".join(cfg.problems()))
    with frozen(model):
        splits = [(1.0, _cached_logits(model, forget)), (cfg.alpha, _cached_logits(model, retain))]
        if adjacent is not None:
            splits.append((cfg.beta, _cached_logits(model, adjacent)))
    width = splits[0][1][0][0].shape[-1]
    device = splits[0][1][0][0].device
    bias = torch.nn.Parameter(torch.zeros(width, device=device))
    opt = torch.optim.AdamW([bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = sum(weight * _split_loss(cached, step, bias) for weight, cached in splits)
        loss.backward()
        opt.step()
    return bias.detach()
