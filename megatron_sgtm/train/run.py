"""The torchrun entry: ``torchrun ... -m megatron_sgtm.train --config X.yaml [key=value ...]``."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..configbase import ConfigError
from .config import load_experiment
from .errors import TrainError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_sgtm.train",
        description="Pretrain one model (run under torchrun; `sgtm train` launches it).")
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    return parser.parse_args(argv)


def _deterministic(threads: int) -> None:
    import torch

    if not torch.cuda.is_available():
        # A fixed thread count fixes the reduction order of CPU kernels: runs repeat bit for bit.
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_experiment(args.config, args.overrides)
    except ConfigError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    _deterministic(cfg.train.threads)
    from ..parallel import destroy_parallel, init_parallel
    from .loop import train

    try:
        try:
            init_parallel(cfg.tensor_parallel, cfg.train.seed,
                          pipeline_parallel=cfg.pipeline_parallel,
                          virtual_pipeline_parallel=cfg.virtual_pipeline_parallel)
            result = train(cfg)
        except (TrainError, ConfigError) as exc:
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return getattr(exc, "exit_code", 2)
        except Exception:
            traceback.print_exc()
            return 1
        if rank == 0:
            evals = " ".join(f"{k}={v:.4f}" for k, v in result.eval.items())
            print(f"done: step {result.step}, {result.tokens_seen} tokens, "
                  f"loss {result.last_loss:.4f} {evals}".rstrip(), flush=True)
        return 0
    finally:
        destroy_parallel()
