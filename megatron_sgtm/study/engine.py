"""Single-process training of one study run (world size 1, TP 1, CPU or one GPU).

A worker process calls ``worker_init`` once (megatron import + a one-rank process group), then
trains any number of runs with ``train_run``; paying the start-up once per worker rather than
once per run (torchrun) is what makes a 10-minute CPU demo possible.
"""
from __future__ import annotations

import atexit
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

_STATE: dict = {}


def worker_init(threads: int = 1) -> None:
    """Idempotent: one-rank gloo group + megatron parallel state for this process."""
    if _STATE.get("ready"):
        return
    import torch

    import torch.distributed as dist

    torch.set_num_threads(max(1, threads))
    from ..parallel import default_backend, init_parallel

    if not dist.is_initialized():
        # A private file store, not MASTER_PORT from the environment: parallel workers (and
        # children of a process that ran one) would otherwise race for the same port.
        fd, store = tempfile.mkstemp(prefix="sgtm-pg-")
        os.close(fd)
        dist.init_process_group(default_backend(), init_method=f"file://{store}", rank=0, world_size=1)
        # The store lives as long as the group (new_group keeps using it).
        atexit.register(lambda: os.path.exists(store) and os.unlink(store))
    init_parallel(1, 0)
    _STATE["ready"] = True


def seed_all(seed: int) -> None:
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    np.random.seed(seed)
    model_parallel_cuda_manual_seed(seed)


def core_config(size, vocab: int, seq: int, entry=None):
    """The CoreConfig of a study run: the size's architecture and forget units, with the
    method entry's (a resolved ``MethodSpec``; None: no routing) routing, partition and MoE
    settings on top."""
    import copy

    from ..config import CoreConfig, PartitionConfig, RoutingConfig

    def pick(key):
        value = None if entry is None else getattr(entry, key)
        return getattr(size, key) if value is None else value

    model = size.model_config(vocab, seq)
    moe = None if entry is None else entry.moe
    forget_mlp = pick("forget_mlp_units")
    if moe is not None:
        model.moe = copy.deepcopy(moe)
        if entry.forget_mlp_units is None and moe.layer_freq == 1:
            forget_mlp = 0  # every block is an MoE block: no dense MLP to hold forget units
    routing = RoutingConfig(method="none") if entry is None or entry.routing_method == "none" else \
        RoutingConfig(method=entry.routing_method, variant=entry.variant,
                      mask_embeddings=entry.mask_embeddings, moe_forget=entry.moe_forget)
    return CoreConfig(
        model=model,
        partition=PartitionConfig(forget_heads=pick("forget_heads"), forget_mlp_units=forget_mlp,
                                  layers=None if entry is None else entry.layers,
                                  forget_experts=(entry.forget_experts or 0) if moe else 0),
        routing=routing)


def batch_of(rows: np.ndarray, labels: Optional[np.ndarray] = None,
             positions: Optional[np.ndarray] = None) -> dict:
    """Packed ``[b, seq+1]`` rows -> a batch the post tools, the model and the trainer's
    ``InputBuilder`` accept; ``labels`` (one per row) become the per-token routing and applied
    labels, which stay on the host: the routing context builds its index sets there.
    ``positions``: each row's place in the run's data order (keys dropout masks)."""
    import torch

    from ..transfer import compute_device, to_device

    t = to_device(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)), compute_device())
    out = {"tokens": t[:, :-1].contiguous(), "targets": t[:, 1:].contiguous()}
    if labels is not None:
        lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        per_token = lab.unsqueeze(1).expand(-1, out["tokens"].shape[1]).contiguous()
        out["routing_labels"] = out["applied_label"] = per_token
    if positions is not None:
        out["sample_position"] = torch.from_numpy(np.asarray(positions, dtype=np.int64))
    return out


def batches_of(packed, batch_size: int) -> list[dict]:
    return [batch_of(packed.tokens[i:i + batch_size]) for i in range(0, len(packed), batch_size)]


@dataclass
class TrainOutcome:
    steps: int
    tokens: int
    tokens_per_label: dict
    forget_tokens_seen: int
    undiscovered_tokens_seen: int
    seconds: float
    curve: list = field(default_factory=list)  # {step, tokens, train_loss, retain, forget}


def _mean_loss(model, rows: np.ndarray) -> float:
    import torch

    from ..post.common import frozen, token_loss, as_batch

    with frozen(model), torch.no_grad():
        return float(token_loss(model, as_batch(batch_of(rows))).mean())


def experiment(model, train, steps: int):
    """The in-memory ``sgtm train`` config of a study run: one process, the study's schedule,
    ``train.micro_batch_size`` sequences per forward/backward. The data are already selected
    and packed (``study/data.py``), so only the routing matters to the trainer."""
    from ..train.config import DataConfig, ExperimentConfig, TrainConfig

    routed = model.core.routing.method
    return ExperimentConfig(
        model=model.core.model, partition=model.core.partition, routing=model.core.routing,
        data=DataConfig(dir="(packed in memory)", method=routed),
        train=TrainConfig(micro_batch_size=train.micro_batch_size or train.batch_size,
                          global_batch_size=train.batch_size,
                          steps=steps, lr=train.lr, min_lr=train.lr * train.min_lr_ratio,
                          warmup_steps=int(train.warmup_fraction * steps),
                          weight_decay=train.weight_decay, grad_clip=train.grad_clip,
                          threads=train.threads))


def train_run(model, packed, train, total_tokens: int, seed: int, curve_sets: dict,
              progress: Callable[[str], None] = lambda m: None) -> TrainOutcome:
    """Train ``model`` in place on ``packed`` for ``total_tokens`` (whole batches).

    The step is ``sgtm train``'s own (engine, micro-batch routing, clip, AdamW over every
    parameter, as the paper: masked gradients are zero, not removed, so momentum and weight
    decay still move masked parameters, SGTM.md section 3)."""
    import torch

    from ..train.batches import InputBuilder
    from ..train.engine import build_engine
    from ..train.loop import accumulate_grads
    from ..train.schedule import lr_at
    from ..transfer import compute_device

    seq, bsz = train.seq_length, train.batch_size
    steps = train.steps_for(total_tokens)
    cfg = experiment(model, train, steps)
    engine = build_engine(model, cfg)
    builder = InputBuilder(cfg, compute_device())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(packed))
    per_label = {0: 0, 1: 0, 2: 0}
    forget_seen = undiscovered_seen = 0
    every = max(1, steps // train.curve_points)
    curve, window = [], []
    start = time.time()
    model.train()
    for step in range(steps):
        idx = np.take(order, np.arange(step * bsz, (step + 1) * bsz), mode="wrap")
        # Past the end of the data, mode="wrap" starts the next epoch in the same order.
        labels = packed.labels[idx]
        micro = cfg.train.micro_batch_size
        batches = [batch_of(packed.tokens[idx[i:i + micro]], labels[i:i + micro],
                            np.arange(step * bsz + i, step * bsz + i + micro))
                   for i in range(0, bsz, micro)]
        window.append(accumulate_grads(engine, builder, batches, builder.device))
        engine.step(lr_at(step, cfg.train))
        for lab in (0, 1, 2):
            per_label[lab] += int((labels == lab).sum()) * seq
        forget_seen += int(packed.forget_tokens[idx].sum())
        undiscovered_seen += int(packed.undiscovered_tokens[idx].sum())
        if (step + 1) % every == 0 or step == steps - 1:
            point = {"step": step + 1, "tokens": (step + 1) * bsz * seq,
                     "train_loss": float(torch.stack(window).mean())}
            for name, rows in curve_sets.items():
                point[name] = _mean_loss(model, rows)
            curve.append(point)
            window = []
            progress(f"step {step + 1}/{steps} loss {point['train_loss']:.3f} "
                     f"({(step + 1) * bsz * seq / (time.time() - start):.0f} tok/s)")
    return TrainOutcome(steps, steps * bsz * seq, {str(k): v for k, v in per_label.items()},
                        forget_seen, undiscovered_seen, time.time() - start, curve)
