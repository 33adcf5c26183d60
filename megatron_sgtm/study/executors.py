"""Where a study's runs execute: here one by one, N local worker processes, or a SLURM array.

Every executor goes through ``runner.execute``, so finished runs are skipped and a failure is
recorded in the run's ``error.txt`` and reported, never hidden; the other runs continue.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Optional

from . import data as sdata
from .runner import Context, execute
from .spec import LABEL_FREE, RunSpec, StudySpec, method_entries

Log = Callable[[str], None]
SBATCH = Path(__file__).resolve().parents[2] / "launch" / "slurm_study_array.sbatch"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_data(spec: StudySpec, out: Path, log: Log = _log) -> Context:
    """Base shards once, then one relabelled copy per undiscovered rate the runs need (and
    per retain-mode share, for methods that set their own)."""
    base = sdata.ensure_base(spec.recipe, spec.data_overrides, out / "data" / "shards", log)
    labelled = [e for e in method_entries(spec).values() if e.base not in LABEL_FREE]
    if any(e.retain_mode_share is None for e in labelled):
        for rate in spec.undiscovered_rates:
            sdata.ensure_rate(base, rate, spec.retain_mode_share, log)
    for share in sorted({e.retain_mode_share for e in labelled} - {None}):
        for rate in spec.undiscovered_rates:
            sdata.ensure_rate(base, rate, share, log, own_share=True)
    if spec.eval.lm_eval_tasks:
        from ..post.lm_eval_run import ensure_study_tasks

        ensure_study_tasks(base, out / "data" / "lm_eval_tasks", spec.eval.lm_eval_tasks, log)
    manifest = json.loads((base / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    return Context(out=out, base_shards=base, vocab=int(tok["vocab_size"]), eod_id=int(tok["eod_id"]))


@dataclasses.dataclass
class Outcome:
    run_id: str
    row: Optional[dict]
    error: Optional[str]


def _one(spec: StudySpec, ctx: Context, run: RunSpec, log: Log = _log) -> Outcome:
    try:
        return Outcome(run.run_id, execute(spec, ctx, run, log), None)
    except Exception as exc:  # recorded in error.txt by execute; reported by the caller
        return Outcome(run.run_id, None, f"{type(exc).__name__}: {exc}")


def run_sequential(spec: StudySpec, ctx: Context, runs: list[RunSpec], log: Log = _log) -> list[Outcome]:
    out = []
    for i, run in enumerate(runs):
        log(f"[{i + 1}/{len(runs)}] {run.run_id}")
        out.append(_one(spec, ctx, run, log))
        if out[-1].error:
            log(f"FAILED {run.run_id}: {out[-1].error} (see {ctx.run_dir(run) / 'error.txt'})")
    return out


def _pool_task(spec: StudySpec, ctx: Context, run: RunSpec) -> Outcome:
    return _one(spec, ctx, run)


def run_parallel(spec: StudySpec, ctx: Context, runs: list[RunSpec], workers: int,
                 log: Log = _log) -> list[Outcome]:
    """``workers`` processes, each one thread; each pays the megatron import once.

    spawn, not fork: the parent has imported torch (its thread pools do not survive a fork)."""
    if workers <= 1:
        return run_sequential(spec, ctx, runs, log)
    out = []
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_pool_task, spec, ctx, run): run for run in runs}
        for fut in as_completed(futures):
            run = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # a worker process died (e.g. killed for memory)
                res = Outcome(run.run_id, None, f"worker died: {exc}")
                (ctx.run_dir(run)).mkdir(parents=True, exist_ok=True)
                (ctx.run_dir(run) / "error.txt").write_text(res.error + "\n")
            out.append(res)
            log(f"[{len(out)}/{len(runs)}] {run.run_id}: " + ("done" if res.row else f"FAILED {res.error}"))
    return out


def array_ranges(indices: list[int]) -> str:
    """Task indices as sbatch's --array list: [0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    out, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def slurm_groups(spec: StudySpec, runs: list[RunSpec]) -> list[tuple[int, list[int]]]:
    """(GPUs per task, task indices) for each array to submit: one array per GPU count."""
    from .spec import size_by_name

    groups: dict[int, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(size_by_name(spec, run.size).gpus, []).append(i)
    return sorted(groups.items())


def submit_slurm(spec_path: str, out: Path, groups: list[tuple[int, list[int]]],
                 overrides: list[str], extra: list[str] = (), log: Log = _log) -> list[str]:
    """Submit one array task per run (``sgtm study SPEC --task-index I``); runs of sizes with
    ``gpus: N > 1`` go in their own array, asking for N GPUs (``--gres=gpu:N``, after the
    caller's arguments, so it wins) and two CPUs per GPU; the task starts torchrun itself."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: the slurm executor needs a SLURM client on PATH")
    jobs = []
    for gpus, indices in groups:
        own = [f"--gres=gpu:{gpus}", f"--cpus-per-task={2 * gpus}"] if gpus > 1 else []
        cmd = ["sbatch", "--parsable", f"--array={array_ranges(indices)}", *extra, *own,
               str(SBATCH), str(Path(spec_path).resolve()), str(out.resolve()), *overrides]
        log("submitting: " + " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
        jobs.append(res.stdout.strip().split(";")[0])
        log(f"submitted array job {jobs[-1]} ({len(indices)} tasks, {gpus} GPU(s) each)")
    log(f"when they finish: sgtm study {spec_path} --out {out} --analyze")
    return jobs
