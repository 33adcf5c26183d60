"""Process groups: torch.distributed + megatron-core parallel_state (DP x PP x TP, and the
expert-parallel groups of MoE models, carved out of DP)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from .cpu_shims import apply_cpu_shims


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def collective_device(group=None) -> torch.device:
    """Where a tensor must be for a collective on ``group``: the current GPU under NCCL,
    the host under gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(tensor_parallel: int, seed: int, backend: str | None = None,
                  pipeline_parallel: int = 1,
                  virtual_pipeline_parallel: int | None = None,
                  expert_parallel: int = 1) -> None:
    """Initialise torch.distributed from the torchrun environment and megatron's TP/PP/DP
    groups (megatron's rank order: TP fastest, then DP, then PP). ``expert_parallel`` ranks of
    each data-parallel group share an MoE block's experts (expert TP = TP)."""
    if not torch.cuda.is_available():
        apply_cpu_shims()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend or default_backend())
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {world} is not divisible by tensor_parallel "
                         f"{tensor_parallel} x pipeline_parallel {pipeline_parallel}")
    if (world // (tensor_parallel * pipeline_parallel)) % expert_parallel:
        raise ValueError(f"the data-parallel size {world // (tensor_parallel * pipeline_parallel)}"
                         f" is not divisible by expert_parallel {expert_parallel}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
            expert_model_parallel_size=expert_parallel)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
