"""``sgtm train --config X.yaml --nproc N --tp T [key=value ...]``: check, then run torchrun.

Flags and overrides come in any order; ``--print-config`` prints the resolved config and exits.

Everything that can be checked without the process group is checked here first, so a bad config,
a damaged shard, a checkpoint of another partition (or with a changed file, or with pickled
content outside the allowlist) or a checkpoint.dir held by a live run is one clear error before
any process starts (and before any checkpoint could be touched); a run whose checkpoint already
reached ``train.steps`` is reported complete and nothing starts.

torchrun's agent then runs in this process (``launcher.py``); with ``--nnodes`` and
``--rdzv-endpoint`` it joins a multi-node rendezvous, one ``sgtm train`` per node.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..cli_args import add_overrides, config_yaml, parse
from ..configbase import ConfigError
from .config import ExperimentConfig, load_experiment
from .errors import TrainError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgtm train", description=(
        "Pretrain with SGTM or a baseline on this machine: validates the config, the shards and "
        "any checkpoint to resume, then runs torchrun --standalone."))
    p.add_argument("--config", required=True, help="experiment YAML (see configs/train/)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this node (world size = nnodes x nproc = DP x TP x PP), "
                        "default 1")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (overrides the config)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (one `sgtm train` on each)")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of the c10d rendezvous (the first node); default: "
                        "--standalone on this machine")
    p.add_argument("--rdzv-id", default=None, help="rendezvous id shared by the nodes (the job id)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart the worker group this often after a worker fails; it resumes "
                        "from the last checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="check (also that the rendezvous port is free) and print the command only")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="resume from a checkpoint even if it holds pickled objects outside the "
                        "allowlist (format 1, unknown classes); sets checkpoint.trust_pickle=true. "
                        "Only for checkpoints whose origin you trust")
    add_overrides(p, "config", "train.steps=100 data.dir=DIR")
    return p


def check_world(cfg: ExperimentConfig, nnodes: int, nproc: int) -> None:
    tp, pp = cfg.tensor_parallel, cfg.pipeline_parallel
    world = nnodes * nproc
    if world % (tp * pp):
        raise TrainError(f"{nnodes} node(s) x {nproc} processes per node (--nproc; "
                         f"GPUS_PER_NODE in the sbatch scripts) = {world} processes, not "
                         f"divisible by tensor_parallel {tp} x pipeline_parallel {pp}")


def check_port_free(endpoint: str) -> None:
    """The rendezvous port must be free where this machine is the endpoint's host."""
    import errno
    import socket

    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise TrainError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT")
    try:
        address = socket.gethostbyname(host)
    except OSError as exc:
        raise TrainError(f"--rdzv-endpoint {endpoint!r}: cannot resolve {host!r} ({exc})") from None
    with socket.socket() as sock:
        # As a listening store does: connections in TIME_WAIT do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TrainError(f"rendezvous port {port} on {host} is in use (another job, or a "
                                 "leftover process?); choose another (SGTM_RDZV_PORT in the "
                                 "sbatch script)") from None
            if exc.errno != errno.EADDRNOTAVAIL:  # EADDRNOTAVAIL: another host's address
                raise TrainError(f"rendezvous port {port} on {host}: {exc}") from None


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
    if split.scan_note():
        print(f"warning: data: {split.scan_note()}", file=sys.stderr, flush=True)
    vocab = ((getattr(split, "manifest", None) or {}).get("tokenizer") or {}).get("vocab_size")
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise TrainError(f"data: tokenizer has {vocab} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}")
    if cfg.checkpoint.dir and cfg.checkpoint.resume != "never":
        check_resumable(cfg)


def check_lock(cfg: ExperimentConfig) -> None:
    """A live run holding checkpoint.dir is an error; a dead one's lock is taken over later."""
    from .runlock import LockHeld, check_free

    try:
        stale = check_free(Path(cfg.checkpoint.dir), cfg.resilience.lock_stale_s)
    except LockHeld as exc:
        raise TrainError(str(exc)) from None
    if stale:
        print(f"warning: {stale}; this run takes it over", file=sys.stderr, flush=True)


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


def launch_plan(args: argparse.Namespace, cfg: ExperimentConfig, overrides: list[str]):
    from .launcher import LaunchPlan

    return LaunchPlan(nproc_per_node=args.nproc, nnodes=args.nnodes,
                      rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                      max_restarts=args.max_restarts,
                      train_args=["--config", args.config, *overrides],
                      preempt_signals=cfg.resilience.signal_names(),
                      stop_grace_s=cfg.resilience.stop_grace_s, threads=cfg.train.threads)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("nproc", "nnodes"):
        if getattr(args, name) <= 0:
            raise TrainError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.max_restarts < 0:
        raise TrainError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise TrainError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node)")


def print_config(cfg: ExperimentConfig, nprocs: int) -> None:
    """The resolved config, after the checks that are properties of the config and the world
    size (types, ranges, layout, batch plan). Shards, checkpoints and devices are not looked
    at, so a config can be checked on a machine that holds none of them."""
    cfg.batch_plan(nprocs)
    print(config_yaml(cfg), end="", flush=True)


def main(argv: list[str]) -> int:
    args = parse(_parser(), argv)
    overrides = list(args.overrides)
    if args.tp is not None:
        overrides.append(f"tensor_parallel={args.tp}")
    if args.trust_checkpoint:
        overrides.append("checkpoint.trust_pickle=true")
    try:
        _check_args(args)
        if not Path(args.config).is_file():
            raise TrainError(f"config {args.config} does not exist")
        cfg = load_experiment(args.config, overrides)
        check_world(cfg, args.nnodes, args.nproc)
        if args.print_config:
            print_config(cfg, args.nproc * args.nnodes)
            return 0
        dry_run = args.dry_run or os.environ.get("SGTM_DRY_RUN") == "1"
        if dry_run and args.rdzv_endpoint:  # starting now would bind it: it must be free
            check_port_free(args.rdzv_endpoint)
        preflight(cfg, args.nproc * args.nnodes)
        from .completion import stored_completion

        done = stored_completion(cfg.checkpoint.dir, cfg.train.steps) \
            if cfg.checkpoint.dir and cfg.checkpoint.resume != "never" else None
        if cfg.checkpoint.dir and not done:
            check_lock(cfg)
    except (ConfigError, TrainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if done:
        print(done, flush=True)
        return 0
    plan = launch_plan(args, cfg, overrides)
    print("+ " + shlex.join(["torchrun", *plan.torchrun_args()]), flush=True)
    if dry_run:
        return 0
    from .launcher import run_agent

    return run_agent(plan)
