"""``sgtm prep``: build shards from a recipe, or relabel finished shards.

    sgtm prep --recipe configs/data/bilingual.yaml --out DIR [key=value ...] [--force] [--workers N]
    sgtm prep --relabel DIR --undiscovered-rate X [--false-positive-rate Y]
              [--retain-mode-share Z] [--seed N] [--threshold T]

Relabelling is a mode of ``prep`` (``--relabel DIR``) rather than its own subcommand,
so the one ``prep`` entry point owns every write to a shard directory.
Errors in the input print ``error: <message>`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from data_prep.errors import PrepError


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides, e.g. max_docs=500 tokenizer.vocab_size=1024")
    p.add_argument("--recipe", help="data recipe YAML (configs/data/*.yaml)")
    p.add_argument("--out", help="output shard directory")
    p.add_argument("--force", action="store_true", help="overwrite a directory holding a different corpus")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="tokenization processes (default: CPU count, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("relabel (rewrites only label sidecars + manifest)")
    g.add_argument("--relabel", metavar="DIR", help="relabel an existing shard directory")
    g.add_argument("--undiscovered-rate", type=float)
    g.add_argument("--false-positive-rate", type=float)
    g.add_argument("--retain-mode-share", type=float)
    g.add_argument("--seed", type=int, help="noise-policy seed")
    g.add_argument("--threshold", type=float, help="classifier threshold")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="sgtm prep", description="Turn raw text into SGTM training shards with controlled label noise."))


def run(args: argparse.Namespace) -> int:
    """Run parsed ``prep`` arguments; raises PrepError on bad input."""
    if args.relabel:
        if args.recipe or args.out or args.overrides:
            raise PrepError("--relabel takes a shard directory and policy flags, not --recipe/--out/overrides")
        from data_prep.relabel import relabel

        m = relabel(args.relabel, args.undiscovered_rate, args.false_positive_rate,
                    args.retain_mode_share, args.seed, args.threshold)
        print(json.dumps({"relabelled": args.relabel, "noise_policy": m["noise_policy"],
                          "realised": m["realised"]}, sort_keys=True, indent=2))
        return 0
    policy_flags = (args.undiscovered_rate, args.false_positive_rate, args.retain_mode_share,
                    args.seed, args.threshold)
    if any(v is not None for v in policy_flags):
        raise PrepError("noise flags go with --relabel; when building, use overrides like noise.undiscovered_rate=0.1")
    if not args.recipe or not args.out:
        raise PrepError("prep needs --recipe PATH and --out DIR (or --relabel DIR)")
    if args.workers < 1:
        raise PrepError("--workers must be >= 1")
    from data_prep.pipeline import prepare
    from data_prep.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    m = prepare(recipe, args.out, force=args.force, workers=args.workers, progress=not args.no_progress)
    summary = {"out": args.out, "classifier": m["classifier"], "realised": m["realised"],
               "tokens": {s: v["num_tokens"] for s, v in m["splits"].items()}}
    print(json.dumps(summary, sort_keys=True, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prep"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
