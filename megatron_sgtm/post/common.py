"""Forward helpers shared by the post-training tools (tensor-parallel aware).

Without labels the model returns vocab-parallel logits ``[b, s, vocab/tp]`` (GPTModel
transposes megatron's ``[s, b]`` back); everything here keeps them
sharded and combines across the TP group only where a full-vocabulary answer is needed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from ..routing import RETAIN, route


@dataclass
class Batch:
    """One micro-batch: ``tokens`` and next-token ``targets`` ``[b, s]``; ``loss_mask`` marks
    positions that count (None: all); ``labels`` are applied routing labels (None: unlabeled)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None

    def mask(self) -> torch.Tensor:
        if self.loss_mask is None:
            return torch.ones_like(self.targets, dtype=torch.float32)
        return self.loss_mask.to(torch.float32)


def as_batch(item) -> Batch:
    """Accept ``Batch``, a mapping with tokens/targets(/labels)/loss_mask, or a tuple."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, dict):
        return Batch(item["tokens"], item.get("targets", item.get("target")),
                     item.get("loss_mask"), item.get("labels"))
    if hasattr(item, "tokens") and hasattr(item, "targets"):
        return Batch(item.tokens, item.targets, getattr(item, "loss_mask", None),
                     getattr(item, "labels", None))
    return Batch(*item)


def batches(items: Iterable) -> Iterator[Batch]:
    for item in items:
        yield as_batch(item)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits ``[b, s, vocab/tp]``."""
    return model(tokens, positions(tokens), None)


def token_loss(model, batch: Batch, logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token cross-entropy ``[b, s]``. ``logit_bias`` is this rank's vocab shard."""
    tokens, targets = batch.tokens, batch.targets
    if logit_bias is None:
        return model(tokens, positions(tokens), None, labels=targets)
    return loss_from_logits(logits(model, tokens), targets, logit_bias)


def loss_from_logits(vp_logits: torch.Tensor, targets: torch.Tensor,
                     logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if logit_bias is not None:
        vp_logits = vp_logits + logit_bias
    return vocab_parallel_cross_entropy(vp_logits.float(), targets)


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def vocab_parallel_argmax(vp_logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over the sharded vocabulary: ``[b, s]`` token ids (ties -> lowest id)."""
    rank, size = tp_rank_size()
    value, index = vp_logits.max(dim=-1)
    index = index + rank * vp_logits.shape[-1]
    if size == 1:
        return index
    values = [torch.empty_like(value) for _ in range(size)]
    indices = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(values, value.contiguous(), group=tp_group())
    dist.all_gather(indices, index.contiguous(), group=tp_group())
    best = torch.stack(values).argmax(dim=0)  # first max wins: the lowest rank, lowest id
    return torch.stack(indices).gather(0, best.unsqueeze(0)).squeeze(0)


def full_logits(vp_logits: torch.Tensor) -> torch.Tensor:
    """All-gather the vocabulary shards: ``[b, s, vocab]``."""
    _rank, size = tp_rank_size()
    if size == 1:
        return vp_logits
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(vp_logits)


@contextlib.contextmanager
def retain_mode(tokens: torch.Tensor):
    """Forwards inside run the masked retain path (forget units switched off) on every token."""
    with route(torch.full_like(tokens, RETAIN)) as ctx:
        yield ctx


@contextlib.contextmanager
def frozen(model):
    """Turn off every parameter's requires_grad (restored after), and eval mode."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in saved:
        p.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
