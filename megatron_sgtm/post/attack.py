"""Adversarial fine-tuning (SGTM.md section 7): full fine-tuning on a 50/50 forget/retain mix,
counting steps and forget tokens until the forget loss reaches a reference (no-filter) loss.

Replicated parameters (norms, row-layer biases) get identical gradients on every TP rank
without sequence parallelism, so a plain torch AdamW per rank keeps the shards consistent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch

from .common import as_batch, token_loss
from .evaluate import evaluate_split


@dataclass
class AttackConfig:
    lr: float = 2e-4
    warmup_steps: int = 200
    cosine_steps: int = 1000  # warm-up included: the schedule reaches 0 at this step
    max_steps: int = 1000
    eval_every: int = 25
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    stop_at_target: bool = True

    def problems(self) -> list[str]:
        out = []
        for name in ("lr", "max_steps", "eval_every", "cosine_steps"):
            if getattr(self, name) <= 0:
                out.append(f"attack.{name}: must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.cosine_steps:
            out.append("attack.warmup_steps: must be in [0, cosine_steps)")
        return out


def lr_at(step: int, cfg: AttackConfig) -> float:
    """Linear warm-up, then cosine to 0 at ``cosine_steps`` (0 afterwards)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.cosine_steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class AttackResult:
    target_loss: Optional[float]
    steps_to_target: Optional[int]
    forget_tokens_to_target: Optional[int]
    curve: list[dict] = field(default_factory=list)  # {step, forget_tokens, forget_loss, lr}

    def row(self) -> dict:
        return asdict(self)


def _mixed_loss(model, forget_item, retain_item) -> tuple[torch.Tensor, int]:
    f, r = as_batch(forget_item), as_batch(retain_item)
    losses, masks = [], []
    for b in (f, r):
        losses.append(token_loss(model, b))
        masks.append(b.mask().to(losses[-1].device))
    loss = torch.cat([l.flatten() for l in losses])
    mask = torch.cat([m.flatten() for m in masks])
    return (loss * mask).sum() / mask.sum().clamp(min=1), int(masks[0].sum())


def adversarial_finetune(model, forget_train: Iterator, retain_train: Iterator, eval_forget,
                         target_loss: Optional[float], cfg: AttackConfig = AttackConfig(),
                         log=None) -> AttackResult:
    """Fine-tune every parameter in place. ``eval_forget`` must be re-iterable."""
    if cfg.problems():
        raise ValueError("; ".join(cfg.problems()))
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    result = AttackResult(target_loss, None, None)
    forget_tokens = 0

    def checkpoint(step: int) -> bool:
        loss = evaluate_split(model, "forget", eval_forget).loss
        result.curve.append({"step": step, "forget_tokens": forget_tokens, "forget_loss": loss,
                             "lr": lr_at(step, cfg)})
        if log:
            log(f"attack step {step}: forget loss {loss:.4f} ({forget_tokens} forget tokens)")
        if target_loss is not None and loss <= target_loss and result.steps_to_target is None:
            result.steps_to_target, result.forget_tokens_to_target = step, forget_tokens
            return cfg.stop_at_target
        return False

    if checkpoint(0):
        return result
    model.train()
    for step in range(1, cfg.max_steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
        opt.zero_grad(set_to_none=True)
        loss, n_forget = _mixed_loss(model, next(forget_train), next(retain_train))
        loss.backward()
        opt.step()
        forget_tokens += n_forget
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            if checkpoint(step):
                break
    return result
