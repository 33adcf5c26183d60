"""``sgtm rmu CKPT --data DIR --out DIR``: RMU unlearning of a (no-filter) checkpoint; writes
a checkpoint that ``sgtm eval`` and ``sgtm attack`` accept."""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ..data import read_manifest
from . import ckpt_io, shards
from .cli_common import add_common, run, say, start


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgtm rmu", description=__doc__)
    add_common(p)
    p.add_argument("--data", type=Path, required=True, help="`sgtm prep` shard directory")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint (must not exist)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--layer", type=int, default=7, help="0-based block to steer")
    p.add_argument("--steering-coeff", type=float, default=20.0)
    p.add_argument("--alpha", type=float, default=100.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p


def _main(args) -> int:
    from .common import model_device
    from .rmu import RMUConfig, rmu_unlearn

    tp = start(args.tp)
    if args.out.exists():
        raise ckpt_io.PostError(f"output {args.out}: already exists; choose another directory")
    cfg = RMUConfig(layer=args.layer, steering_coeff=args.steering_coeff, alpha=args.alpha,
                    lr=args.lr, steps=args.steps, batch_size=args.batch, seed=args.seed)
    manifest = read_manifest(args.data)
    model, core, meta = ckpt_io.load(args.checkpoint, tp, args.trust_checkpoint)
    ckpt_io.check_tokenizer(meta, manifest, args.checkpoint, args.data)
    if cfg.problems() or cfg.layer >= core.model.num_layers:
        raise ckpt_io.PostError("; ".join(cfg.problems() or [
            f"--layer {cfg.layer} is outside the model's blocks 0..{core.model.num_layers - 1}"]))
    seq = args.seq or core.model.seq_length
    device = model_device(model)
    forget = shards.stream(shards.sequences(args.data, "train", seq, truth=1), cfg.batch_size,
                           cfg.seed + 1, device)
    retain = shards.stream(shards.sequences(args.data, "train", seq, truth=0), cfg.batch_size,
                           cfg.seed + 2, device)
    history = rmu_unlearn(model, forget, retain, cfg, log=say)
    ckpt_io.save(args.out, model, core, meta, {"rmu": asdict(cfg), "rmu_final": history[-1],
                                              "source": str(args.checkpoint)})
    say(f"rmu: checkpoint written to {args.out}")
    return 0


def main(argv: list[str]) -> int:
    return run(_main, parser(), argv)
