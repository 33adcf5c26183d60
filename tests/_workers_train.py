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


def train_variants(rank, world, shards, root, variants):
    """Train each ``(name, overrides)`` in turn on this process group (TP may change between
    variants: megatron's groups are rebuilt, torch.distributed's stays)."""
    from megatron.core import parallel_state as ps

    from megatron_sgtm.parallel import init_parallel
    from megatron_sgtm.train.config import load_experiment
    from megatron_sgtm.train.errors import TrainError
    from megatron_sgtm.train.loop import train

    out = {}
    for name, steps, overrides in variants:
        run_dir = str(Path(root) / name)
        cfg = load_experiment(TINY, base_overrides(shards, run_dir, steps) + list(overrides))
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_parallel(cfg.tensor_parallel, cfg.train.seed)
        try:
            result = train(cfg)
            out[name] = {"loss": result.last_loss, "eval": result.eval}
        except TrainError as exc:
            out[name] = {"error": str(exc), "exit_code": exc.exit_code}
    return out
