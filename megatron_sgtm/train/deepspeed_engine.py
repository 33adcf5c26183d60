"""DeepSpeed ZeRO-1/2 as an alternative engine (``engine.name: deepspeed``).

DeepSpeed 0.19.8 asks its ``mpu`` for ``get_model_parallel_*`` (megatron-core renamed them to
``get_tensor_model_parallel_*``), so a small adapter maps them onto parallel_state. We hand
DeepSpeed a torch AdamW: its own CPU FusedAdam would JIT-compile for minutes.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from .chunks import ModelChunks
from .config import ExperimentConfig
from .pipeline import plain_forward_backward, plain_forward_only
from .schedule import set_lr, torch_adamw


class MegatronMPU:
    """The model-parallel unit DeepSpeed expects, answered by megatron's parallel_state."""

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks():
        import torch.distributed as dist

        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    # The DeepSpeed engine runs without pipeline or sequence parallelism (refused at load).
    @staticmethod
    def get_pipeline_model_parallel_world_size():
        return 1

    @staticmethod
    def get_pipeline_model_parallel_rank():
        return 0


def _skip_shm_build() -> None:
    # DeepSpeed's torch backend JIT-compiles a shared-memory collective op (about a minute)
    # on CPU at init; gloo's collectives serve us, so build nothing.
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def ds_config(cfg: ExperimentConfig, dp: int, accum: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * dp,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.dtype_on(torch.cuda.is_available()) == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model, cfg: ExperimentConfig):
        _skip_shm_build()
        import deepspeed

        chunks = ModelChunks.of(model)
        if len(chunks) != 1:
            raise ValueError("the DeepSpeed engine takes one whole model (no pipeline chunks)")
        model = chunks[0]
        self.model = chunks
        self.cfg = cfg
        dp = ps.get_data_parallel_world_size()
        _, self.accum = cfg.batch_plan(dp * ps.get_tensor_model_parallel_world_size())
        self.module, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch_adamw(model, cfg.train),
            config=ds_config(cfg, dp, self.accum), mpu=MegatronMPU(),
            dist_init_required=False)

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes its gradient partitions after each boundary step

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # The loss is already divided by the accumulation count; ZeRO reduces the gradients
        # inside backward and the boundary step.
        self.module.backward(loss, scale_wrt_gas=False)
        if not last:
            self.module.step()  # counts the micro-step; no update off the boundary

    def forward_backward(self, builder, micro_batches: list[dict], device) -> torch.Tensor:
        return plain_forward_backward(self.module, self._backward, builder, micro_batches,
                                      device)

    def forward_only(self, builder, batches: list[dict], device) -> torch.Tensor:
        return plain_forward_only(self.module, builder, batches, device)

    def step(self, lr: float) -> torch.Tensor:
        set_lr(self.optimizer, lr)
        self.module.step()  # the accumulation boundary: reduce, clip, update
        norm = self.module.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def checkpoint_optimizer(self):
        # ZeRO's partitioned optimizer is neither a torch optimizer nor megatron-sharded:
        # DeepSpeed saves it itself, inside the same atomic checkpoint directory (hook).
        return None

    def checkpoint_hooks(self) -> tuple:
        return (self,)

    def save(self, directory) -> None:
        self.module.save_checkpoint(str(Path(directory) / "deepspeed"), tag="state",
                                    save_latest=False)

    def after_load(self, directory) -> None:
        if not self.cfg.checkpoint.trust_pickle:
            # DeepSpeed unpickles its files with weights_only=False: vet them first.
            from ..checkpoint.vetting import vet_deepspeed

            vet_deepspeed(Path(directory) / "deepspeed")
        path, _ = self.module.load_checkpoint(
            str(Path(directory) / "deepspeed"), tag="state", load_optimizer_states=True,
            load_lr_scheduler_states=False, load_module_only=False)
        if path is None:
            from ..checkpoint import CheckpointError

            raise CheckpointError(f"{directory}: no DeepSpeed optimizer state (saved by "
                                  "another engine?)")
