"""Worker functions for the distributed training tests (spawned by tests/distributed.py)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny_cpu.yaml"


def base_overrides(shards: str, run_dir: str, steps: int) -> list[str]:
    return [f"data.dir={shards}", f"logging.run_dir={run_dir}", "checkpoint.dir=",
            f"train.steps={steps}", "train.log_every=1", "train.warmup_steps=2",
            "train.micro_batch_size=4", "train.global_batch_size=8",
            "logging.progress_bar=false", "logging.wandb=off", "data.eval_batches=2"]


def read_metrics(run_dir: str) -> list[dict]:
    """The metrics records, the last one per (step, kind) when a resumed run re-logged."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: str) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def _drop_latest_checkpoint(ck_dir: str) -> None:
    """Rank 0 deletes the newest checkpoint, so the next run resumes from the one before."""
    import shutil

    import torch.distributed as dist

    if dist.get_rank() == 0:
        newest = sorted(p for p in Path(ck_dir).glob("step_*") if ".tmp" not in p.name)[-1]
        shutil.rmtree(newest)
        (Path(ck_dir) / "latest").unlink(missing_ok=True)
    dist.barrier()


def train_variants(rank, world, shards, root, variants):
    """Train each ``(name, steps, overrides[, resume])`` in turn on this process group (TP may
    change between variants: megatron's groups are rebuilt, torch.distributed's stays).

    With ``resume``, the run checkpoints into ROOT/NAME-ck, then its newest checkpoint is
    deleted and the same run is started again: it resumes half-way and logs the rest again."""
    from megatron.core import parallel_state as ps

    from megatron_sgtm.parallel import init_parallel
    from megatron_sgtm.train.config import load_experiment
    from megatron_sgtm.train.errors import TrainError
    from megatron_sgtm.train.loop import train

    out = {}
    for name, steps, overrides, *resume in variants:
        run_dir = str(Path(root) / name)
        extra = list(overrides)
        if resume and resume[0]:
            extra += [f"checkpoint.dir={run_dir}-ck", f"checkpoint.save_every={steps // 2}"]
        cfg = load_experiment(TINY, base_overrides(shards, run_dir, steps) + extra)
        for attempt in range(2 if resume and resume[0] else 1):
            if attempt:
                _drop_latest_checkpoint(cfg.checkpoint.dir)
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            init_parallel(cfg.tensor_parallel, cfg.train.seed)
            try:
                result = train(cfg)
                out[name] = {"loss": result.last_loss, "eval": result.eval}
            except TrainError as exc:
                out[name] = {"error": str(exc), "exit_code": exc.exit_code}
    return out


def train_compiled(rank, world, shards, root, backend):
    """The same run eager, then under torch.compile; the compiled run's graph-break count and
    number of compiled graphs come back with the losses (read from dynamo's counters)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    out = train_variants(rank, world, shards, root, [
        ("eager", 6, ["tensor_parallel=2", "train.compile=false"])])
    torch._dynamo.reset()
    counters.clear()
    out.update(train_variants(rank, world, shards, root, [
        ("compiled", 6, ["tensor_parallel=2", "train.compile=true",
                         f"train.compile_backend={backend}"])]))
    out["graph_breaks"] = sum(counters["graph_break"].values())
    out["unique_graphs"] = counters["stats"]["unique_graphs"]
    return out


def count_grad_reductions(rank, world, shards, overlap):
    """Data-parallel all-reduce calls made by a step of two accumulated micro-batches."""
    import torch
    import torch.distributed as dist

    from megatron_sgtm.model import build_model
    from megatron_sgtm.parallel import init_parallel
    from megatron_sgtm.train.batches import InputBuilder
    from megatron_sgtm.train.config import load_experiment
    from megatron_sgtm.train.engine import build_engine
    from megatron_sgtm.train.loop import accumulate_grads

    cfg = load_experiment(TINY, [f"data.dir={shards}", "train.global_batch_size=16",
                                 f"engine.overlap_grad_reduce={str(overlap).lower()}"])
    init_parallel(1, cfg.train.seed)
    engine = build_engine(build_model(cfg.core), cfg)
    builder = InputBuilder(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    micro = []
    for _ in range(2):
        rows = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_length + 1), generator=gen)
        labels = torch.tensor([2, 1, 0, 0]).unsqueeze(1).expand(4, cfg.model.seq_length)
        micro.append({"tokens": rows[:, :-1], "targets": rows[:, 1:], "routing_labels": labels,
                      "applied_label": labels})
    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        # TP is 1, so only the data-parallel reduction spans both ranks (megatron's loss
        # also all-reduces over the one-rank TP group).
        if dist.get_world_size(kwargs.get("group")) == 2:
            calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    # The second step is the steady state: megatron learns in the first which gradients a
    # step produces, and only then starts bucket reductions from inside the backward.
    accumulate_grads(engine, builder, micro, torch.device("cpu"))
    dist.all_reduce = counting
    try:
        accumulate_grads(engine, builder, micro, torch.device("cpu"))
    finally:
        dist.all_reduce = original
    return {"calls": len(calls), "buckets": sum(len(g.buckets) for g in engine.module.bucket_groups)}


def startup_world(rank, world, run_dir, cold_file):
    """Each rank records its start; rank 1 first reads a file evicted from the page cache,
    so its own read_bytes, and only its, carry that file's size."""
    import torch
    import torch.distributed as dist

    from megatron_sgtm.process_io import evict
    from megatron_sgtm.train.startup import record_startup

    dist.init_process_group("gloo", rank=rank, world_size=world)
    if rank == 1:
        evict([Path(cold_file)])
        Path(cold_file).read_bytes()
    dist.barrier()
    printed = []
    record = record_startup(5, torch.device("cpu"), rank == 0, run_dir, printed.append)
    dist.destroy_process_group()
    return record, printed
