"""Independent reference helpers for TP tests: shard a full (TP=1) state dict for a TP rank and
gather per-rank tensors back, following megatron-core's documented layouts."""
from __future__ import annotations

import re

import torch

_COLUMN = re.compile(r"(linear_qkv|linear_fc1|output_layer|word_embeddings)\.(weight|bias)$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")


def _fc1_gated(name: str, gated: bool) -> bool:
    return gated and "linear_fc1" in name


def shard(name: str, full: torch.Tensor, tp: int, rank: int, gated: bool) -> torch.Tensor:
    if _fc1_gated(name, gated):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], dim=0).clone()
    if _COLUMN.search(name):
        return full.chunk(tp, dim=0)[rank].clone()
    if _ROW.search(name):
        return full.chunk(tp, dim=1)[rank].clone()
    return full.clone()


def unshard(name: str, parts: list[torch.Tensor], gated: bool) -> torch.Tensor:
    if _fc1_gated(name, gated):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], 0)
    if _COLUMN.search(name):
        return torch.cat(parts, 0)
    if _ROW.search(name):
        return torch.cat(parts, 1)
    return parts[0]


def load_full_state(model, full: dict, tp: int, rank: int, gated: bool) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(shard(name, full[name], tp, rank, gated))


def gather_full(named: dict, tp: int, gated: bool) -> dict:
    """All-gather each tensor over the TP group (world == TP in these tests) and unshard."""
    import torch.distributed as dist

    out = {}
    for name, tensor in named.items():
        if tp == 1:
            out[name] = tensor.clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(parts, tensor.contiguous())
        out[name] = unshard(name, parts, gated)
    return out
