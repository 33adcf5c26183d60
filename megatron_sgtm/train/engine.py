"""The one place that picks how gradients are reduced and parameters updated.

- GPU, ``engine.name: megatron``: megatron-core ``DistributedDataParallel`` (fp32 main grads)
  and ``get_megatron_optimizer`` (bf16 params with fp32 main params unless ``model.params_dtype``
  says fp32; distributed optimizer optional). Its AdamW is TE's or apex's fused one when
  installed, else torch's AdamW switched to the fused kernel. Clipping is ours (a device-side
  coefficient, no host sync) except under the distributed optimizer, whose sharded grads only
  megatron's clip can measure (it reads the norm on the host once per step).
- CPU, ``engine.name: megatron``: the same megatron DDP for the data-parallel all-reduce, but a
  torch AdamW and our TP-aware clip, because megatron's optimizer checks for CUDA tensors.
- ``engine.name: deepspeed``: ZeRO-1/2 (``deepspeed_engine.py``).

Every engine exposes: ``model`` (this rank's model chunks, ``ModelChunks``),
``forward_backward(builder, micro_batches, device) -> step loss``,
``forward_only(builder, batches, device) -> [loss sum, tokens]``, ``zero_grad()``,
``step(lr) -> grad-norm tensor`` and ``optimizer``. Losses live on the last pipeline stage.
"""
from __future__ import annotations

import torch

from .chunks import ModelChunks
from .config import ExperimentConfig
from .grads import clip_grads, grad_of
from .pipeline import ScheduledSteps
from .schedule import set_lr, torch_adamw


def _ddp(model, cfg: ExperimentConfig, distributed_optimizer: bool, first_chunk: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.engine.overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer)
    # As megatron's training does: only the first chunk's gradients are bucketed for overlap.
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   disable_bucketing=not first_chunk)


class MegatronEngine:
    """megatron-core DDP and schedules (+ megatron optimizer on GPU, torch AdamW + our clip
    on CPU)."""

    name = "megatron"

    def __init__(self, model, cfg: ExperimentConfig):
        self.model = ModelChunks.of(model)
        self.cfg = cfg
        self.on_gpu = torch.cuda.is_available()
        # Our device-side clip everywhere but under the distributed optimizer, whose sharded
        # gradients only megatron's clip can measure.
        self.own_clip = not cfg.engine.distributed_optimizer
        self.modules = [_ddp(chunk, cfg, cfg.engine.distributed_optimizer, i == 0)
                        for i, chunk in enumerate(self.model)]
        self.module = self.modules[0]
        self.steps = ScheduledSteps(self.modules, cfg.model.seq_length,
                                    cfg.train.micro_batch_size, cfg.sequence_parallel)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.on_gpu:
            self.optimizer = self._megatron_optimizer()
        else:
            self.optimizer = torch_adamw(self.model, cfg.train)

    def _megatron_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t, bf16 = self.cfg.train, self.cfg.model.dtype_on(cuda=True) == "bf16"
        config = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_eps=t.eps,
            clip_grad=0.0 if self.own_clip else t.grad_clip,
            bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=self.cfg.engine.distributed_optimizer)
        optimizer = get_megatron_optimizer(config, self.modules)
        for inner in _torch_optimizers(optimizer):
            _switch_to_fused(inner)
        return optimizer

    def zero_grad(self) -> None:
        for module in self.modules:
            module.zero_grad_buffer()
        if self.on_gpu:
            self.optimizer.zero_grad()
        else:
            for p in self.params:
                p.grad = None

    def forward_backward(self, builder, micro_batches: list[dict], device) -> torch.Tensor:
        """The step's gradients, reduced (megatron DDP scales by 1/DP before summing)."""
        return self.steps.forward_backward(builder, micro_batches, device)

    def forward_only(self, builder, batches: list[dict], device) -> torch.Tensor:
        return self.steps.forward_only(builder, batches, device)

    def step(self, lr: float) -> torch.Tensor:
        if self.on_gpu:
            # Clipping the model's fp32 main grads before megatron copies them to its main
            # params is the same as clipping those copies.
            norm = clip_grads(self.params, self.cfg.train.grad_clip) if self.own_clip else None
            for group in self.optimizer.param_groups:
                group["lr"] = lr
                if "wd_mult" in group:  # megatron's groups carry the no-decay rule this way
                    group["weight_decay"] = self.cfg.train.weight_decay * group["wd_mult"]
            _, megatron_norm, _ = self.optimizer.step()
            if norm is not None:
                return norm
            return torch.as_tensor(float("nan") if megatron_norm is None else megatron_norm)
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


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's wrapper (chained or single)."""
    wrappers = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [w.optimizer for w in wrappers if getattr(w, "optimizer", None) is not None]


def _switch_to_fused(optimizer) -> None:
    """Without TE or apex, megatron falls back to torch's AdamW with its default multi-tensor
    path; the fused kernel is one launch per step instead of several per tensor group. The
    flag is read at every step, and the step counters it needs on the device are created at
    the first step, so switching before any step is complete."""
    if type(optimizer) is not torch.optim.AdamW or optimizer.state:
        return
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    optimizer.defaults.update(fused=True, foreach=False)


def build_engine(model, cfg: ExperimentConfig):
    """``model``: a model, or this rank's list of pipeline chunks."""
    if cfg.engine.name == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg)
    return MegatronEngine(model, cfg)
