"""Shared plumbing of the post-training commands: process group, errors, rank-0 output."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from .ckpt_io import PostError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tp: int | None) -> int:
    """Initialise torch.distributed + megatron; single process unless launched by torchrun.
    Returns the TP size (default: the whole world)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    world = int(os.environ["WORLD_SIZE"])
    tp = tp or world
    from ..parallel import init_parallel

    try:
        init_parallel(tp, seed=0)
    except ValueError as exc:
        raise PostError(str(exc)) from None
    return tp


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def say(message: str) -> None:
    if is_rank0():
        print(message, flush=True)


def run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: list[str]) -> int:
    """Parse, run, turn expected failures into ``error: ...`` + exit 2, always tear down."""
    args = parser.parse_args(argv)
    from .evaluate import EvalError
    from ..data import DataError
    from .ablate import PruneError
    from .export_hf import ExportError

    try:
        return main(args)
    except (PostError, EvalError, DataError, PruneError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from ..parallel import destroy_parallel

        destroy_parallel()


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="checkpoint directory (or a root: latest), or a Hugging Face "
                             "safetensors export (`sgtm ablate --export hf`)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load pickled objects even when they are not on the allowlist "
                             "(format-1 checkpoints, unknown classes); only for checkpoints "
                             "whose origin you trust")
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel size (default: all ranks; 1 without torchrun)")


def add_data(parser: argparse.ArgumentParser, seq_default: int | None = None,
             required: bool = True) -> None:
    parser.add_argument("--data", type=Path, required=required, help="`sgtm prep` shard directory")
    parser.add_argument("--seq", type=int, default=seq_default,
                        help="sequence length (default: the model's)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size")
    parser.add_argument("--max-sequences", type=int, default=256,
                        help="held-out sequences per split")


def atomic_dir(out: Path):
    """A temp sibling to write into; ``commit()`` renames it to ``out``."""
    out = Path(out)
    if out.exists():
        raise PostError(f"output {out}: already exists; choose another directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    return tmp
