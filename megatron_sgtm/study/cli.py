"""``sgtm study SPEC.yaml``: run a sweep, then tabulate, fit, and plot.

    sgtm study SPEC [key=value ...] [--out DIR] [--workers N]      local (N parallel workers)
    sgtm study SPEC --executor slurm [--sbatch-arg=...]              one SLURM array task per run
    sgtm study SPEC --task-index I                                   run task I (what SLURM calls)
    sgtm study SPEC --analyze                                        tables/fits/plots only
    sgtm study SPEC --analyze --page docs/results.md                 also a markdown results page
    sgtm study SPEC --list                                           print the runs, run nothing
    sgtm study SPEC --print-config [key=value ...]                   the resolved spec as YAML

Outputs under OUT: results.csv / results.jsonl (one row per run, status done|failed|pending),
analysis.json, report.txt and plots/*.png. Finished runs are skipped on a re-run; failed ones
are retried and, while they fail, reported with their error file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..cli_args import add_overrides, config_yaml, parse
from ..configbase import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgtm study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="study spec YAML (configs/studies/*.yaml)")
    add_overrides(p, "study spec", "seeds=[0]")
    p.add_argument("--out", help="study directory (default runs/study/<spec name>)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--task-index", type=int, help="run only this task (SLURM array index)")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch argument")
    p.add_argument("--analyze", action="store_true", help="only tabulate, fit and plot")
    p.add_argument("--list", action="store_true", help="list the runs and exit")
    p.add_argument("--page", help="also write a markdown results page here (plots beside it)")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def finalize(spec, ctx, runs, out: Path) -> tuple[list[dict], dict]:
    """Results table, analysis and plots from whatever runs have finished."""
    from . import plots
    from .analysis import analyze, format_report
    from .runner import write_json
    from .table import collect, status_counts, write_csv, write_jsonl

    rows = collect(ctx, runs)
    write_csv(out / "results.csv", rows)
    write_jsonl(out / "results.jsonl", rows)
    curves, train_curves = {}, {}
    for r in rows:
        rdir = out / "runs" / r["run_id"]
        if r["status"] == "done" and (rdir / "attack.json").exists():
            curves[r["run_id"]] = json.loads((rdir / "attack.json").read_text())["curve"]
        if r["status"] == "done" and (rdir / "train.json").exists():
            train_curves[r["run_id"]] = json.loads((rdir / "train.json").read_text())["curve"]
    result = analyze(rows, curves)
    write_json(out / "analysis.json", result)
    report = f"runs: {status_counts(rows)}\n" + format_report(result)
    for r in rows:
        if r["status"] == "failed":
            report += f"\nFAILED {r['run_id']}: {r['error']}"
    (out / "report.txt").write_text(report + "\n")
    pdir = out / "plots"
    plots.tradeoff(rows, pdir / "tradeoff.png", f"{spec.name}: retain/forget trade-off")
    plots.loss_curves(train_curves, pdir / "loss_curves.png", rows)
    plots.leakage_plot(result["leakage"], pdir / "leakage.png")
    plots.penalty_bars(result["penalty_summary"], pdir / "penalty.png")
    if result["fits"]:
        plots.scaling_plot(result["fits"], pdir / "scaling.png")
    if curves:
        targets = {e["run_id"]: e["target_forget_loss"] for e in result["attack"]
                   if e["target_forget_loss"] is not None}
        plots.attack_curves(curves, targets, pdir / "attack.png", rows)
    print(report)
    return rows, result


def run(args: argparse.Namespace) -> int:
    from .executors import prepare_data, run_parallel, run_sequential, slurm_groups, submit_slurm
    from .spec import expand, load_spec, method_entries

    spec = load_spec(args.spec, args.overrides)
    if args.print_config:
        print(config_yaml(spec), end="")
        return 0
    out = Path(args.out or Path("runs") / "study" / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    ctx = prepare_data(spec, out, _log)
    runs = expand(spec, ctx.vocab)
    entries = {name: dataclasses.asdict(e) for name, e in method_entries(spec).items()}
    (out / "spec.json").write_text(json.dumps({"spec": args.spec, "overrides": args.overrides,
                                               "methods": entries,
                                               "runs": [r.to_dict() for r in runs]}, indent=1))
    if args.list:
        for i, r in enumerate(runs):
            print(f"{i:4d} {r.run_id}")
        return 0
    if args.task_index is not None:
        if not 0 <= args.task_index < len(runs):
            raise ConfigError([f"--task-index {args.task_index} is outside 0..{len(runs) - 1}"])
        res = run_sequential(spec, ctx, [runs[args.task_index]], _log)
        return 1 if res[0].error else 0
    if args.executor == "slurm" and not args.analyze:
        try:
            submit_slurm(args.spec, out, slurm_groups(spec, runs), args.overrides,
                         args.sbatch_arg, _log)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.analyze:
        from .page import record_execution

        todo = [r for r in runs if not (ctx.run_dir(r) / "result.json").exists()]
        _log(f"study {spec.name}: {len(runs)} runs ({len(runs) - len(todo)} done earlier), "
             f"{args.workers} worker(s), out {out}")
        start = time.time()
        run_parallel(spec, ctx, todo, args.workers, _log)
        record_execution(out, start, args.workers, len(todo))
    rows, result = finalize(spec, ctx, runs, out)
    if args.page:
        from .page import write_page

        _log(f"results page: {write_page(spec, args.spec, out, rows, result, Path(args.page))}")
    failed = [r for r in rows if r["status"] == "failed"]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(build_parser(), argv)
    if args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        return run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from data_prep.errors import PrepError

        if isinstance(exc, PrepError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
