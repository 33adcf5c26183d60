"""The one place that picks how gradients are reduced and parameters updated.

- GPU, ``engine.name: megatron``: megatron-core ``DistributedDataParallel`` (fp32 main grads)
  and ``get_megatron_optimizer`` (fused AdamW, bf16 params with fp32 main params when
  ``model.params_dtype`` is bf16, distributed optimizer optional, megatron's TP-aware clip).
- CPU, ``engine.name: megatron``: the same megatron DDP for the data-parallel all-reduce, but a
  torch AdamW and our TP-aware clip, because megatron's optimizer checks for CUDA tensors.
- ``engine.name: deepspeed``: ZeRO-1/2 (``deepspeed_engine.py``).

Every engine exposes: ``module`` (call it for the forward), ``model`` (the bare GPTModel),
``zero_grad()``, ``backward(loss, last)``, ``reduce_grads()``, ``step(lr) -> grad-norm tensor`` and ``optimizer``.
"""
from __future__ import annotations

import torch

from .config import ExperimentConfig
from .errors import TrainError
from .grads import clip_grads, grad_of
from .schedule import set_lr, torch_adamw


def _ddp(model, cfg: ExperimentConfig, distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


class MegatronEngine:
    """megatron-core DDP (+ megatron optimizer on GPU, torch AdamW + our clip on CPU)."""

    name = "megatron"

    def __init__(self, model, cfg: ExperimentConfig):
        self.model = model
        self.cfg = cfg
        self.on_gpu = torch.cuda.is_available()
        if cfg.engine.distributed_optimizer and not self.on_gpu:
            raise TrainError("engine.distributed_optimizer needs CUDA (megatron's distributed "
                             "optimizer checks for CUDA tensors); turn it off on CPU")
        self.module = _ddp(model, cfg, cfg.engine.distributed_optimizer)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.on_gpu:
            self.optimizer = self._megatron_optimizer()
        else:
            self.optimizer = torch_adamw(model, cfg.train)

    def _megatron_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t, bf16 = self.cfg.train, self.cfg.model.params_dtype == "bf16"
        config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_eps=t.eps, clip_grad=t.grad_clip,
            bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=self.cfg.engine.distributed_optimizer)
        return get_megatron_optimizer(config, [self.module])

    def zero_grad(self) -> None:
        self.module.zero_grad_buffer()
        if self.on_gpu:
            self.optimizer.zero_grad()
        else:
            for p in self.params:
                p.grad = None

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def reduce_grads(self) -> None:
        """Data-parallel all-reduce (megatron DDP scales by 1/DP before summing)."""
        self.module.finish_grad_sync()

    def step(self, lr: float) -> torch.Tensor:
        if self.on_gpu:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
                if "wd_mult" in group:  # megatron's groups carry the no-decay rule this way
                    group["weight_decay"] = self.cfg.train.weight_decay * group["wd_mult"]
            _, norm, _ = self.optimizer.step()
            return torch.as_tensor(float("nan") if norm is None else norm)
        norm = clip_grads(self.params, self.cfg.train.grad_clip)
        for p in self.params:
            p.grad = grad_of(p)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        return norm

    def checkpoint_optimizer(self):
        """What the checkpoint stores for the optimizer (megatron's is sharded-aware)."""
        return self.optimizer

    def checkpoint_hooks(self) -> tuple:
        return ()

    def after_load(self, directory) -> None:
        pass


def build_engine(model, cfg: ExperimentConfig):
    if cfg.engine.name == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg)
    return MegatronEngine(model, cfg)
