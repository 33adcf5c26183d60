"""Logit calibration for evaluation (SGTM.md section 5): train only a fresh output-logit bias.

The model is frozen, so its logits are computed under no_grad (once per batch and reused while
they fit ``cache_elements``); the bias (this rank's vocabulary shard) is the only tensor the
optimizer sees. Loss:
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
    # Keep frozen logits in memory up to this many elements per split (else recompute).
    cache_elements: int = 50_000_000

    def problems(self) -> list[str]:
        out = []
        if self.steps <= 0:
            out.append(f"calibration.steps: must be positive, got {self.steps}")
        if self.lr <= 0:
            out.append(f"calibration.lr: must be positive, got {self.lr}")
        if self.alpha < 0 or self.beta < 0:
            out.append("calibration.alpha/beta: must be >= 0")
        return out


class _SplitLogits:
    """Frozen logits of one split's batches, cached when small enough."""

    def __init__(self, model, items: Iterable, budget: int):
        self.model, self.items = model, list(batches(items))
        if not self.items:
            raise ValueError("calibration needs at least one batch per split")
        self.cache = None
        first = self._compute(self.items[0])
        if first[0].numel() * len(self.items) <= budget:
            self.cache = [first] + [self._compute(b) for b in self.items[1:]]
        self.width, self.device = first[0].shape[-1], first[0].device

    @torch.no_grad()
    def _compute(self, b) -> tuple:
        return logits(self.model, b.tokens).detach().float(), b.targets, b.mask()

    def loss(self, step: int, bias: torch.Tensor) -> torch.Tensor:
        i = step % len(self.items)
        if self.cache is not None:
            vp, targets, mask = self.cache[i]
        else:
            with frozen(self.model):
                vp, targets, mask = self._compute(self.items[i])
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
        splits = [(1.0, _SplitLogits(model, forget, cfg.cache_elements)),
                  (cfg.alpha, _SplitLogits(model, retain, cfg.cache_elements))]
        if adjacent is not None:
            splits.append((cfg.beta, _SplitLogits(model, adjacent, cfg.cache_elements)))
    bias = torch.nn.Parameter(torch.zeros(splits[0][1].width, device=splits[0][1].device))
    opt = torch.optim.AdamW([bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = sum(weight * split.loss(step, bias) for weight, split in splits)
        loss.backward()
        opt.step()
    return bias.detach()
