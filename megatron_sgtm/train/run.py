"""The torchrun entry: ``torchrun ... -m megatron_sgtm.train --config X.yaml [key=value ...]``."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..cli_args import parse
from ..configbase import ConfigError
from .config import load_experiment
from .errors import EXIT_PREEMPTED, TrainError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_sgtm.train",
        description="Pretrain one model (run under torchrun; `sgtm train` launches it).")
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    return parse(parser, argv)


def _deterministic(threads: int) -> None:
    import torch

    if not torch.cuda.is_available():
        # A fixed thread count fixes the reduction order of CPU kernels: runs repeat bit for bit.
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: end with it (parentdeath.py)
        from .parentdeath import die_with_parent, helpers_die_with_me

        die_with_parent()
        helpers_die_with_me()
    try:
        cfg = load_experiment(args.config, args.overrides)
    except ConfigError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from .guard import RunGuard, stop_request
    from .preempt import signal_name

    stop = stop_request(cfg, rank)  # before the slow imports: a signal then is not fatal
    _deterministic(cfg.train.threads)
    import torch.distributed as dist

    from ..parallel import destroy_parallel, init_parallel
    from .completion import complete_message
    from .loop import train

    try:
        try:
            init_parallel(cfg.tensor_parallel, cfg.train.seed,
                          pipeline_parallel=cfg.pipeline_parallel,
                          virtual_pipeline_parallel=cfg.virtual_pipeline_parallel,
                          expert_parallel=cfg.expert_parallel)
            with RunGuard.open(cfg, dist.get_rank(), stop) as guard:
                result = train(cfg, guard)
        except (TrainError, ConfigError) as exc:
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return getattr(exc, "exit_code", 2)
        except Exception as exc:
            if stop.signum is not None:
                # Asked to stop, and a collective failed: a peer is gone (torchrun stops the
                # survivors this way before a restart). The traceback would only be noise.
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"rank {rank}: stopped by {signal_name(stop.signum)} with a peer gone "
                      f"({first[:200]})", file=sys.stderr, flush=True)
                return 1
            traceback.print_exc()
            return 1
        if result.already_complete:
            if rank == 0:
                print(complete_message(result.step, cfg.train.steps,
                                       {"loss": result.last_loss, "eval": result.eval},
                                       cfg.checkpoint.dir), flush=True)
            return 0
        if result.stopped_by:
            if rank == 0:
                saved = (f"checkpoint step {result.step} saved in {cfg.checkpoint.dir}"
                         if cfg.checkpoint.dir else "nothing saved (checkpoint.dir is empty)")
                print(f"preempted: {result.stopped_by} at step {result.step} of "
                      f"{cfg.train.steps}; {saved}; exit {EXIT_PREEMPTED} (run again, or "
                      "requeue, to continue)", flush=True)
            return EXIT_PREEMPTED
        if rank == 0:
            evals = " ".join(f"{k}={v:.4f}" for k, v in result.eval.items())
            print(f"done: step {result.step}, {result.tokens_seen} tokens, "
                  f"loss {result.last_loss:.4f} {evals}".rstrip(), flush=True)
        return 0
    finally:
        destroy_parallel()
