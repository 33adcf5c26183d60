"""Where this process computes, and host-to-device copies that never wait for the GPU.

A copy from ordinary (pageable) host memory makes CUDA synchronise the stream first, so the
host waits until every queued kernel has run, even with ``non_blocking=True``. From pinned
memory the copy is queued like a kernel. Per-step inputs (tokens, routing index sets) are
small, so pinning them costs less than one such wait.
"""
from __future__ import annotations

import torch


def compute_device() -> torch.device:
    """This process's GPU when there is one (set by the launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device``; host tensors bound for CUDA go through pinned memory."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)
