"""The pretraining loop: micro-batches, gradient accumulation, routing, logging, checkpoints.

Loss convention: every micro-batch contributes the mean over its positions divided by the
accumulation count, and the data-parallel reduction averages, so one optimizer step sees the
mean over the global batch whatever the DP x accumulation split.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..configbase import config_to_dict
from ..routing import route
from . import io
from .batches import InputBuilder
from .config import ExperimentConfig
from .engine import build_engine
from .errors import NonFiniteLoss, TrainError
from .grads import PartitionNorms
from .metrics import LabelCounters, MetricsSink
from .schedule import lr_at


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    last_loss: float
    eval: dict


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(value, group=ps.get_data_parallel_group())
        value = value / ps.get_data_parallel_world_size()
    return value


@torch.no_grad()
def evaluate(engine, cfg: ExperimentConfig, builder: InputBuilder, dp_rank: int,
             dp_size: int) -> dict:
    """Mean token loss on each held-out split (a fixed set of sequences, split over DP)."""
    model = engine.model
    was_training = model.training
    model.eval()
    out = {}
    for split in cfg.data.eval_splits:
        batches = io.eval_batches(cfg, split, dp_rank, dp_size)
        if batches is None:
            continue
        total = torch.zeros(2, dtype=torch.float64, device=_device())
        for batch in batches:
            inputs = builder(batch)
            token_loss = model(inputs.tokens, inputs.position_ids, None, labels=inputs.targets)
            total += torch.stack([token_loss.double().sum(),
                                  torch.tensor(float(token_loss.numel()), dtype=torch.float64,
                                               device=total.device)])
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        if total[1] > 0:
            out[f"eval/{split}"] = float(total[0] / total[1])
    model.train(was_training)
    return out


def train(cfg: ExperimentConfig) -> TrainResult:
    """Train under an initialised process group (see ``run.main``)."""
    world = dist.get_world_size()
    dp_size, accum = cfg.batch_plan(world)
    dp_rank = ps.get_data_parallel_rank()
    is_rank0 = dist.get_rank() == 0
    device = _device()

    manifest = io.check_data(cfg)
    batches = io.train_batches(cfg, dp_rank, dp_size)
    from ..model import build_model

    model = build_model(cfg.core)
    engine = build_engine(model, cfg)
    builder = InputBuilder(cfg, device, io.control_ids(manifest, cfg))
    counters = LabelCounters()
    part_norms = PartitionNorms(model, cfg.routing) if engine.name == "megatron" and \
        not cfg.engine.distributed_optimizer else None

    step, tokens_seen = 0, 0
    extra = io.resume(cfg, engine)
    if extra is not None:
        step, tokens_seen = int(extra["step"]), int(extra["tokens_seen"])
        batches.load_state_dict(extra["data"])
        counters.load_state_dict(extra["counters"])

    sink = MetricsSink(is_rank0, cfg.run_dir, cfg.logging.wandb, cfg.logging.project,
                       cfg.logging.run_name, config_to_dict(cfg), cfg.logging.progress_bar,
                       cfg.train.steps, step)
    if extra is not None:
        sink.message(f"resumed from step {step}")
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    iterator = iter(batches)
    model.train()
    last_loss, eval_out = float("nan"), {}
    t_log, tok_log = time.perf_counter(), tokens_seen
    try:
        while step < cfg.train.steps:
            lr = lr_at(step, cfg.train)
            engine.zero_grad()
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for micro in range(accum):
                batch = next(iterator)
                counters.add(batch)
                inputs = builder(batch)
                with route(inputs.routing_labels):
                    token_loss = engine.module(inputs.tokens, inputs.position_ids, None,
                                               labels=inputs.targets)
                loss = builder.loss(token_loss, inputs) / accum
                engine.backward(loss, last=micro == accum - 1)
                loss_sum += loss.detach()
            engine.reduce_grads()
            # Every rank learns the same global loss, so a non-finite one stops all of them
            # together (one rank stopping alone would hang the others in a collective). This
            # is the step's one host sync; the optimizer's norm/clip syncs anyway.
            global_loss = float(_dp_mean(loss_sum))
            if not math.isfinite(global_loss):
                raise NonFiniteLoss(
                    f"loss is {global_loss} at step {step + 1}; stopping without saving "
                    f"(the last good checkpoint stays in {cfg.checkpoint.dir or '(none)'}); "
                    "lower train.lr or check the data")
            log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
            norms = part_norms.norms() if (log_now and part_norms is not None) else {}
            grad_norm = engine.step(lr)
            step += 1
            tokens_seen += tokens_per_step
            last_loss = global_loss
            sink.step(step, tokens_seen, global_loss)
            if log_now:
                now = time.perf_counter()
                record = {"step": step, "loss": global_loss, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_seen": tokens_seen,
                          "tokens_per_s": (tokens_seen - tok_log) / max(now - t_log, 1e-9),
                          **norms, **counters.reduced(ps.get_data_parallel_group())}
                t_log, tok_log = now, tokens_seen
                sink.log(record)
            eval_now = step == cfg.train.steps or (cfg.train.eval_every
                                                   and step % cfg.train.eval_every == 0)
            if eval_now and cfg.data.eval_batches:
                eval_out = evaluate(engine, cfg, builder, dp_rank, dp_size)
                if eval_out:
                    sink.log({"step": step, **eval_out})
            save_now = step == cfg.train.steps or (cfg.checkpoint.save_every
                                                   and step % cfg.checkpoint.save_every == 0)
            if save_now and cfg.checkpoint.dir:
                io.save(cfg, step, engine, {
                    "step": step, "tokens_seen": tokens_seen, "data": batches.state_dict(),
                    "counters": counters.state_dict(), "manifest": io.manifest_summary(manifest)})
    finally:
        sink.close()
    return TrainResult(step=step, tokens_seen=tokens_seen, last_loss=last_loss, eval=eval_out)


__all__ = ["train", "evaluate", "TrainResult", "TrainError", "NonFiniteLoss"]
