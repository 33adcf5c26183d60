"""The pretraining loop: micro-batches, gradient accumulation, routing, logging, checkpoints.

Loss convention: every micro-batch contributes the mean over its positions divided by the
accumulation count, and the data-parallel reduction averages, so one optimizer step sees the
mean over the global batch whatever the DP x accumulation split. The engine runs the
micro-batches (``pipeline.py``: megatron-core's schedules for the megatron engine).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..configbase import config_to_dict
from ..transfer import compute_device
from . import io
from .batches import InputBuilder
from .config import ExperimentConfig
from .engine import build_engine
from .errors import NonFiniteLoss, TrainError
from .fastpath import check_device, compile_model
from .grads import PartitionNorms
from .guard import RunGuard
from .losswatch import LossWatch
from .metrics import LabelCounters, MetricsSink
from .schedule import lr_at
from .startup import record_startup


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    last_loss: float
    eval: dict
    stopped_by: Optional[str] = None  # the preempt signal that ended the run early
    already_complete: bool = False  # the checkpoint had reached train.steps: nothing trained


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
        total = engine.forward_only(builder, list(batches), compute_device())
        if ps.get_pipeline_model_parallel_world_size() > 1:  # the loss is on the last stage
            dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        if total[1] > 0:
            out[f"eval/{split}"] = float(total[0] / total[1])
    model.train(was_training)
    return out


def accumulate_grads(engine, builder: InputBuilder, micro_batches: list[dict],
                     device: torch.device) -> torch.Tensor:
    """Forward and backward every micro-batch of one step under its routing, and reduce the
    gradients over data parallelism (and pipeline / sequence-parallel copies). Returns this
    rank's step loss, still on the device (zero off the last pipeline stage)."""
    engine.zero_grad()
    return engine.forward_backward(builder, micro_batches, device)


def train(cfg: ExperimentConfig, guard: Optional[RunGuard] = None) -> TrainResult:
    """Train under an initialised process group (see ``run.main``, which passes the guard:
    checkpoint.dir lock, preempt signals, hang watchdog; without one none of them acts)."""
    guard = guard or RunGuard.inactive()
    world = dist.get_world_size()
    dp_size, accum = cfg.batch_plan(world)
    dp_rank = ps.get_data_parallel_rank()
    is_rank0 = dist.get_rank() == 0
    device = compute_device()

    split = io.check_data(cfg)
    manifest = dict(split.manifest)
    batches = io.train_batches(cfg, dp_rank, dp_size, split)
    from ..model import build_model_chunks

    check_device(cfg, device.type == "cuda")
    chunks = build_model_chunks(cfg.core, seed=cfg.train.seed)
    compiled = any([compile_model(chunk, cfg.train, device) for chunk in chunks])
    engine = build_engine(chunks, cfg)
    model = engine.model
    builder = InputBuilder(cfg, device, io.control_ids(manifest, cfg))
    counters = LabelCounters()
    part_norms = PartitionNorms(model, cfg.routing) if engine.name == "megatron" and \
        not cfg.engine.distributed_optimizer else None

    step, tokens_seen = 0, 0
    extra = io.resume(cfg, engine)
    if extra is not None:
        step, tokens_seen = int(extra["step"]), int(extra["tokens_seen"])
        if step >= cfg.train.steps:  # finished before: report the stored metrics, train nothing
            done = extra.get("metrics") or {}
            return TrainResult(step, tokens_seen, done.get("loss", float("nan")),
                               done.get("eval") or {}, already_complete=True)
        batches.load_state_dict(extra["data"])
        counters.load_state_dict(extra["counters"])

    sink = MetricsSink(is_rank0, cfg.run_dir, cfg.logging.wandb, cfg.logging.project,
                       cfg.logging.run_name, config_to_dict(cfg), cfg.logging.progress_bar,
                       cfg.train.steps, step)
    if extra is not None:
        sink.message(f"resumed from step {step}")
    if compiled:
        sink.message(f"torch.compile ({cfg.train.compile_backend}): the first steps compile")
    watch = LossWatch(ps.get_data_parallel_group(), dp_size, cfg.checkpoint.dir,
                      ps.get_pipeline_model_parallel_group()
                      if ps.get_pipeline_model_parallel_world_size() > 1 else None)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    record_startup(step, device, is_rank0, cfg.run_dir, sink.message)
    iterator = iter(batches)
    model.train()
    last_loss, eval_out, since_log = float("nan"), {}, []
    t_log, tok_log = time.perf_counter(), tokens_seen
    try:
        while step < cfg.train.steps:
            guard.beat(step)
            lr = lr_at(step, cfg.train)
            micro_batches = [next(iterator) for _ in range(accum)]
            for batch in micro_batches:
                counters.add(batch)
            loss_sum = accumulate_grads(engine, builder, micro_batches, device)
            log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
            norms = part_norms.norms() if (log_now and part_norms is not None) else {}
            grad_norm = engine.step(lr)
            step += 1
            tokens_seen += tokens_per_step
            # The loss stays on the device until a log, eval or save reads it (losswatch.py).
            watch.add(step, loss_sum)
            eval_now = step == cfg.train.steps or (cfg.train.eval_every
                                                   and step % cfg.train.eval_every == 0)
            stop = step < cfg.train.steps and guard.should_stop(step)  # collective
            save_now = stop or step == cfg.train.steps or (cfg.checkpoint.save_every
                                                           and step % cfg.checkpoint.save_every == 0)
            if log_now or eval_now or save_now:
                since_log += watch.read()
                last_loss = watch.last
            sink.step(step, tokens_seen, last_loss if log_now else None)
            if log_now:
                now = time.perf_counter()
                record = {"step": step, "loss": last_loss,
                          "loss_mean_since_log": sum(since_log) / len(since_log), "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_seen": tokens_seen,
                          "tokens_per_s": (tokens_seen - tok_log) / max(now - t_log, 1e-9),
                          **norms, **counters.reduced(ps.get_data_parallel_group())}
                t_log, tok_log, since_log = now, tokens_seen, []
                sink.log(record)
            if eval_now and cfg.data.eval_batches:
                guard.beat(step, "evaluating")
                eval_out = evaluate(engine, cfg, builder, dp_rank, dp_size)
                if eval_out:
                    sink.log({"step": step, **eval_out})
            if save_now and cfg.checkpoint.dir:
                with guard.saving(step):
                    io.save(cfg, step, engine, {
                        "step": step, "tokens_seen": tokens_seen, "data": batches.state_dict(),
                        "counters": counters.state_dict(), "manifest": io.manifest_summary(manifest),
                        "metrics": {"loss": last_loss, "eval": eval_out}})
            if stop:
                break
    finally:
        sink.close()
    return TrainResult(step=step, tokens_seen=tokens_seen, last_loss=last_loss, eval=eval_out,
                       stopped_by=guard.stop_signal_name)


__all__ = ["train", "evaluate", "accumulate_grads", "TrainResult", "TrainError", "NonFiniteLoss"]
