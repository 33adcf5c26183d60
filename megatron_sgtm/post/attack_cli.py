"""``sgtm attack CKPT --data DIR``: adversarial full fine-tuning on a 50/50 forget/retain mix
until the forget loss reaches a reference (``--target-loss`` or a ``--reference`` no-filter
checkpoint's forget loss). Reports the loss curve, steps and forget tokens to the target."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import read_manifest
from . import ckpt_io, shards
from .cli_common import add_common, add_data, is_rank0, run, say, start
from .eval_cli import ROUTED


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgtm attack", description=__doc__)
    add_common(p)
    add_data(p)
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--target-loss", type=float, help="forget loss to reach")
    ref.add_argument("--reference", type=Path, help="checkpoint whose forget loss is the target")
    p.add_argument("--ablate", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--cosine-steps", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="append a JSON line here")
    return p


def _main(args) -> int:
    from .ablate import zero_forget_
    from .attack import AttackConfig, adversarial_finetune
    from .common import model_device
    from .evaluate import evaluate_split, write_jsonl

    tp = start(args.tp)
    manifest = read_manifest(args.data)
    cfg = AttackConfig(lr=args.lr, warmup_steps=args.warmup, cosine_steps=args.cosine_steps,
                       max_steps=args.max_steps, eval_every=args.eval_every)
    if cfg.problems():
        raise ckpt_io.PostError("; ".join(cfg.problems()))
    model, core, meta = ckpt_io.load(args.checkpoint, tp, args.trust_checkpoint)
    ckpt_io.check_tokenizer(meta, manifest, args.checkpoint, args.data)
    seq = args.seq or core.model.seq_length
    device = model_device(model)
    eval_forget = shards.to_batches(shards.sequences(args.data, "test_forget", seq,
                                                     args.eval_sequences), args.batch, device)
    target = args.target_loss
    if args.reference is not None:
        ref, _, ref_meta = ckpt_io.load(args.reference, tp, args.trust_checkpoint)
        ckpt_io.check_tokenizer(ref_meta, manifest, args.reference, args.data)
        target = evaluate_split(ref, "forget", eval_forget).loss
        del ref
        say(f"attack: reference forget loss {target:.4f}")
    if args.ablate == "yes" or (args.ablate == "auto" and core.routing.method in ROUTED):
        zero_forget_(model)
    half = max(1, args.batch // 2)
    forget = shards.stream(shards.sequences(args.data, "train", seq, truth=1), half, 1, device)
    retain = shards.stream(shards.sequences(args.data, "train", seq, truth=0), half, 2, device)
    res = adversarial_finetune(model, forget, retain, eval_forget, target, cfg, log=say)
    say(f"attack: steps to target {res.steps_to_target}, forget tokens "
        f"{res.forget_tokens_to_target} (target {target:.4f})")
    if args.out and is_rank0():
        write_jsonl(args.out, [{"checkpoint": str(args.checkpoint), **res.row()}])
    return 0


def main(argv: list[str]) -> int:
    return run(_main, parser(), argv)
