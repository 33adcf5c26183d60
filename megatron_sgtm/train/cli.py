"""``sgtm train --config X.yaml --nproc N --tp T [key=value ...]``: check, then launch torchrun.

Everything that can be checked without the process group is checked here first, so a bad config,
a damaged shard, or a checkpoint of another partition, with a changed file or with pickled
content outside the allowlist, is one clear error before any process starts (and before any
checkpoint could be touched).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..configbase import ConfigError
from .config import ExperimentConfig, load_experiment
from .errors import TrainError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgtm train", description=(
        "Pretrain with SGTM or a baseline on this machine: validates the config, the shards and "
        "any checkpoint to resume, then runs torchrun --standalone."))
    p.add_argument("--config", required=True, help="experiment YAML (see configs/train/)")
    p.add_argument("--nproc", type=int, default=1, help="processes (DP x TP), default 1")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (overrides the config)")
    p.add_argument("--dry-run", action="store_true", help="check and print the command only")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="resume from a checkpoint even if it holds pickled objects outside the "
                        "allowlist (format 1, unknown classes); sets checkpoint.trust_pickle=true. "
                        "Only for checkpoints whose origin you trust")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def preflight(cfg: ExperimentConfig, nproc: int) -> None:
    """Checks that need no process group: batch plan, shards, resumable checkpoint."""
    cfg.batch_plan(nproc)
    import importlib.util

    import torch

    from .fastpath import check_device

    check_device(cfg, torch.cuda.is_available())
    if cfg.engine.name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise TrainError("engine.name=deepspeed but DeepSpeed is not installed "
                         "(pip install 'megatron_sgtm[deepspeed]')")
    from .. import data

    try:
        split = data.open_split(cfg.data.dir, cfg.data.split)
    except data.DataError as exc:
        raise TrainError(f"data: {exc}") from None
    vocab = ((getattr(split, "manifest", None) or {}).get("tokenizer") or {}).get("vocab_size")
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise TrainError(f"data: tokenizer has {vocab} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}")
    if cfg.checkpoint.dir and cfg.checkpoint.resume != "never":
        check_resumable(cfg)


def check_resumable(cfg: ExperimentConfig) -> None:
    from .. import checkpoint as ck
    from ..partition import build_partition

    root = Path(cfg.checkpoint.dir)
    latest = ck.latest_checkpoint(root) if root.exists() else None
    if latest is None:
        return
    trust = cfg.checkpoint.trust_pickle
    try:
        meta = ck.verify_checkpoint(latest, trust_pickle=trust)
        if cfg.engine.name == "deepspeed" and not trust and (latest / "deepspeed").is_dir():
            from ..checkpoint.vetting import vet_deepspeed

            vet_deepspeed(latest / "deepspeed")
    except ck.CheckpointError as exc:
        raise TrainError(f"checkpoint: {exc}") from None
    stored = meta.get("partition_meta") or meta.get("partition") or {}
    expected = build_partition(cfg.model, cfg.partition, cfg.routing).to_metadata()
    if stored != expected:
        raise TrainError(f"checkpoint {latest} was trained with another partition "
                         f"({stored}); this config implies {expected}. Use another "
                         "checkpoint.dir or set checkpoint.resume=never with a fresh dir")


def torchrun_command(config: str, nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "megatron_sgtm.train", "--config", config,
            *overrides]


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.tp is not None:
        overrides.append(f"tensor_parallel={args.tp}")
    if args.trust_checkpoint:
        overrides.append("checkpoint.trust_pickle=true")
    try:
        if args.nproc <= 0:
            raise TrainError(f"--nproc must be positive, got {args.nproc}")
        cfg = load_experiment(args.config, overrides)
        preflight(cfg, args.nproc)
    except (ConfigError, TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = torchrun_command(args.config, args.nproc, overrides)
    print("+ " + shlex.join(command), flush=True)
    if args.dry_run or os.environ.get("SGTM_DRY_RUN") == "1":
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(cfg.train.threads))
    return subprocess.call(command, env=env)
