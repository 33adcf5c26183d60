"""Tensor-parallel shards <-> the full (TP=1) parameter layout, by megatron-core's rules.

Column-parallel tensors (qkv, fc1, output layer, word embeddings) split on dim 0, row-parallel
weights (proj, fc2) on dim 1; a gated fc1 shard is ``[gate_local; up_local]`` while the full
tensor is ``[gate; up]``. Everything else is replicated on every TP rank.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from .common import tp_group, tp_rank_size

_COLUMN = re.compile(r"(linear_qkv|linear_fc1|output_layer|word_embeddings)\.(weight|bias)$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")


def split_kind(name: str, gated: bool) -> str:
    if gated and re.search(r"linear_fc1\.(weight|bias)$", name):
        return "gated"
    if _COLUMN.search(name):
        return "column"
    if _ROW.search(name):
        return "row"
    return "replicated"


def shard(name: str, full: torch.Tensor, tp: int, rank: int, gated: bool) -> torch.Tensor:
    kind = split_kind(name, gated)
    if kind == "gated":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], 0)
    if kind == "column":
        return full.chunk(tp, 0)[rank]
    if kind == "row":
        return full.chunk(tp, 1)[rank]
    return full


def unshard(name: str, parts: list[torch.Tensor], gated: bool) -> torch.Tensor:
    kind = split_kind(name, gated)
    if kind == "gated":
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], 0)
    if kind == "column":
        return torch.cat(parts, 0)
    if kind == "row":
        return torch.cat(parts, 1)
    return parts[0]


@torch.no_grad()
def gather_full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter in the TP=1 layout (a CPU copy), on every TP rank."""
    rank, tp = tp_rank_size()
    gated = model.core.model.activation == "swiglu"
    out = {}
    for name, param in model.named_parameters():
        tensor = param.detach()
        if tp > 1 and split_kind(name, gated) != "replicated":
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group())
            tensor = unshard(name, parts, gated)
        out[name] = tensor.to("cpu", copy=True)
    return out


@torch.no_grad()
def load_full_params(model, full: dict[str, torch.Tensor]) -> None:
    """Copy a TP=1-layout parameter dict into this rank's shards (names and shapes must match)."""
    rank, tp = tp_rank_size()
    gated = model.core.model.activation == "swiglu"
    names = dict(model.named_parameters())
    missing = sorted(set(names) - set(full))
    if missing:
        raise ValueError(f"full state lacks parameters: {missing[:5]}")
    for name, param in names.items():
        piece = shard(name, full[name], tp, rank, gated)
        if piece.shape != param.shape:
            raise ValueError(f"{name}: shard shape {tuple(piece.shape)} != parameter "
                             f"{tuple(param.shape)}")
        param.copy_(piece)
