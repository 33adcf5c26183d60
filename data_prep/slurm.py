"""The SLURM executor: the global stage here, then one array task per group of shards, then
a reduce job that starts when every array task succeeded (``--dependency=afterok``).

Array tasks run ``launch/slurm_prep_array.sbatch map`` which calls ``sgtm prep --task-index
$SLURM_ARRAY_TASK_ID``: the same map function as the local executor, so the files are
byte-identical. A failed or killed task leaves its shards unmarked; submitting again redoes
only those.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

from data_prep.errors import PrepError

SBATCH = Path(__file__).resolve().parents[1] / "launch" / "slurm_prep_array.sbatch"
MAX_ARRAY_TASKS = 1000  # a common MaxArraySize; more tasks get more shards each


def array_commands(recipe_path: str, out: Path, overrides: list[str], n_shards: int,
                   shards_per_task: int, extra: list[str] = ()) -> tuple[list[str], list[str]]:
    """The two sbatch command lines (array, then reduce); the reduce's dependency is filled
    in with the array's job id as ``{job}``."""
    tasks = -(-n_shards // shards_per_task)
    recipe_path, out = str(Path(recipe_path).resolve()), str(Path(out).resolve())
    common = [recipe_path, out, *overrides]
    array = ["sbatch", "--parsable", f"--array=0-{tasks - 1}", *extra, str(SBATCH), "map", *common,
             "--shards-per-task", str(shards_per_task)]
    # A failed array task makes the dependency unsatisfiable: cancel the reduce then.
    reduce = ["sbatch", "--parsable", "--dependency=afterok:{job}", "--kill-on-invalid-dep=yes", *extra,
              str(SBATCH), "reduce", *common]
    return array, reduce


def submit(array: list[str], reduce: list[str], log: Callable[[str], None], env=None) -> tuple[str, str]:
    if shutil.which("sbatch") is None:
        raise PrepError("sbatch not found: --executor slurm needs a SLURM client on PATH")
    jobs: list[str] = []
    for template in (array, reduce):
        cmd = [c.replace("{job}", jobs[0]) if jobs else c for c in template]
        log("submitting: " + " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            raise PrepError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
        jobs.append(res.stdout.strip().split(";")[0])
    log(f"submitted array job {jobs[0]} and reduce job {jobs[1]}; the manifest appears when "
        "the reduce finishes")
    return jobs[0], jobs[1]
