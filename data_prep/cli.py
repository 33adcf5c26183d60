"""``sgtm prep``: build shards from a recipe, relabel finished shards, or merge them.

    sgtm prep --recipe R.yaml --out DIR [key=value ...] [--force] [--workers N]
    sgtm prep --recipe R.yaml --print-config [key=value ...]                (the resolved recipe)
    sgtm prep --recipe R.yaml --out DIR --executor slurm [--shards-per-task K] [--sbatch-arg=...] [--dry-run]
    sgtm prep --recipe R.yaml --out DIR --task-index I --shards-per-task K     (what a SLURM array task runs)
    sgtm prep --recipe R.yaml --out DIR --stage reduce                        (what the reduce job runs)
    sgtm prep --relabel DIR --undiscovered-rate X [--false-positive-rate Y]
              [--retain-mode-share Z] [--seed N] [--threshold T]
    sgtm prep --merge DIR --out DIR2 [--shards-per-file K]

Relabelling and merging are modes of ``prep`` rather than their own subcommands, so the one
``prep`` entry point owns every write to a shard directory.
Errors in the input print ``error: <message>`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from data_prep.errors import PrepError
from megatron_sgtm.cli_args import add_overrides, config_yaml, parse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_overrides(p, "recipe", "max_docs=500 tokenizer.vocab_size=1024")
    p.add_argument("--recipe", help="data recipe YAML (configs/data/*.yaml)")
    p.add_argument("--out", help="output shard directory")
    p.add_argument("--force", action="store_true",
                   help="start afresh, replacing a directory that holds a different corpus")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="local map processes, one shard each (default: CPU count, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("SLURM")
    s.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="slurm: global stage here, then an sbatch array of map tasks and a reduce job")
    s.add_argument("--shards-per-task", type=int,
                   help="shards per array task (default: enough for at most 1000 tasks)")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch argument, e.g. --sbatch-arg=--partition=cpu (repeatable)")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    s.add_argument("--task-index", type=int, help="run one array task's shards (what SLURM calls)")
    s.add_argument("--stage", choices=("all", "reduce"), default="all",
                   help="reduce: only verify finished shards, label them and write the manifest")
    g = p.add_argument_group("relabel (rewrites only label sidecars + manifest)")
    g.add_argument("--relabel", metavar="DIR", help="relabel an existing shard directory")
    g.add_argument("--undiscovered-rate", type=float)
    g.add_argument("--false-positive-rate", type=float)
    g.add_argument("--retain-mode-share", type=float)
    g.add_argument("--seed", type=int, help="noise-policy seed")
    g.add_argument("--threshold", type=float, help="classifier threshold")
    m = p.add_argument_group("merge (fewer, larger train files; streams in bounded memory)")
    m.add_argument("--merge", metavar="DIR", help="finished shard directory to merge into --out")
    m.add_argument("--shards-per-file", type=int, default=16, help="train shards per merged file")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="sgtm prep", description="Turn raw text into SGTM training shards with controlled label noise."))


def _relabel(args) -> int:
    if args.recipe or args.out or args.overrides:
        raise PrepError("--relabel takes a shard directory and policy flags, not --recipe/--out/overrides")
    from data_prep.relabel import relabel

    m = relabel(args.relabel, args.undiscovered_rate, args.false_positive_rate,
                args.retain_mode_share, args.seed, args.threshold)
    print(json.dumps({"relabelled": args.relabel, "noise_policy": m["noise_policy"],
                      "realised": m["realised"]}, sort_keys=True, indent=2))
    return 0


def _summary(out: str, m: dict) -> None:
    print(json.dumps({"out": out, "classifier": m["classifier"], "realised": m["realised"],
                      "train_shards": len(m["splits"]["train"]["shards"]),
                      "tokens": {s: v["num_tokens"] for s, v in m["splits"].items()}},
                     sort_keys=True, indent=2))


def _slurm(args, recipe) -> int:
    from data_prep import pipeline, slurm

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.dry_run:
        from data_prep.plan import make_plan

        n = len(make_plan(recipe))
    else:
        n = len(pipeline.global_only(recipe, args.out, args.force, log))
    k = args.shards_per_task or pipeline.default_shards_per_task(n, slurm.MAX_ARRAY_TASKS)
    array, reduce = slurm.array_commands(args.recipe, args.out, args.overrides, n, k, args.sbatch_arg)
    if args.dry_run:
        print(" ".join(array))
        print(" ".join(reduce))
        return 0
    job, reduce_job = slurm.submit(array, reduce, log)
    print(json.dumps({"array_job": job, "reduce_job": reduce_job, "shards": n, "shards_per_task": k}))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run parsed ``prep`` arguments; raises PrepError on bad input."""
    if args.print_config:
        if not args.recipe or args.relabel or args.merge:
            raise PrepError("--print-config prints a recipe: it needs --recipe PATH "
                            "(and no --relabel/--merge)")
        from data_prep.recipe import load_recipe

        print(config_yaml(load_recipe(args.recipe, args.overrides)), end="")
        return 0
    if args.relabel:
        return _relabel(args)
    policy_flags = (args.undiscovered_rate, args.false_positive_rate, args.retain_mode_share,
                    args.seed, args.threshold)
    if any(v is not None for v in policy_flags):
        raise PrepError("noise flags go with --relabel; when building, use overrides like noise.undiscovered_rate=0.1")
    if args.merge:
        if not args.out or args.recipe or args.overrides:
            raise PrepError("--merge DIR needs --out DIR2 (and no --recipe/overrides)")
        from data_prep.merge import merge_directory

        m = merge_directory(args.merge, args.out, args.shards_per_file)
        _summary(args.out, m)
        return 0
    if not args.recipe or not args.out:
        raise PrepError("prep needs --recipe PATH and --out DIR (or --relabel DIR, or --merge DIR --out DIR2)")
    if args.workers < 1:
        raise PrepError("--workers must be >= 1")
    if args.shards_per_task is not None and args.shards_per_task < 1:
        raise PrepError("--shards-per-task must be >= 1")
    from data_prep import pipeline
    from data_prep.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.executor == "slurm":
        return _slurm(args, recipe)
    if args.task_index is not None:
        if args.task_index < 0:
            raise PrepError("--task-index must be >= 0")
        pipeline.run_task(recipe, args.out, args.task_index, args.shards_per_task or 1)
        return 0
    if args.stage == "reduce":
        _summary(args.out, pipeline.reduce_only(recipe, args.out))
        return 0
    m = pipeline.prepare(recipe, args.out, force=args.force, workers=args.workers, progress=not args.no_progress)
    _summary(args.out, m)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prep"]:
        argv = argv[1:]
    args = parse(build_parser(), argv)
    try:
        try:
            return run(args)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
            raise PrepError(f"{e.filename or args.out}: {e.strerror}; the output is incomplete "
                            "(no manifest) and the same command continues it once there is space") from None
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
