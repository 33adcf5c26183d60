"""The SLURM executor: the generated array + reduce commands, the array script's own command,
and a real run on a one-node cluster that ends byte-identical to a local run."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.slurm import SBATCH
from prep_corpus import RECIPE_OVERRIDES, tree, write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    recipe = write_corpus(root)
    local = root / "local"
    assert main(["--recipe", str(recipe), "--out", str(local), "--no-progress", "--workers", "2",
                 *RECIPE_OVERRIDES]) == 0
    return recipe, local


def test_generated_array_and_reduce_commands(corpus, tmp_path, capsys):
    recipe, local = corpus
    out = tmp_path / "out"
    n = len(json.loads((local / ".prep" / "plan.json").read_text())["shards"])
    assert main(["--recipe", str(recipe), "--out", str(out), "--executor", "slurm", "--dry-run",
                 "--shards-per-task", "2", "--sbatch-arg=--partition=cpu", *RECIPE_OVERRIDES]) == 0
    array, reduce = capsys.readouterr().out.splitlines()
    common = f"{SBATCH} {{}} {recipe.resolve()} {out.resolve()} {' '.join(RECIPE_OVERRIDES)}"
    assert array == (f"sbatch --parsable --array=0-{math.ceil(n / 2) - 1} --partition=cpu "
                     + common.format("map") + " --shards-per-task 2")
    assert reduce == ("sbatch --parsable --dependency=afterok:{job} --kill-on-invalid-dep=yes "
                      "--partition=cpu " + common.format("reduce"))
    assert not out.exists()  # a dry run writes nothing


def test_array_script_runs_one_task(tmp_path):
    env = dict(os.environ, SGTM_DRY_RUN="1", SLURM_ARRAY_TASK_ID="3")
    res = subprocess.run(["bash", str(SBATCH), "map", "r.yaml", "out", "a=1", "--shards-per-task", "2"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("+ sgtm prep --recipe r.yaml --out out --no-progress --task-index 3 "
                                  "a=1 --shards-per-task 2")
    res = subprocess.run(["bash", str(SBATCH), "reduce", "r.yaml", "out"], env=env, capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.stdout.strip() == "+ sgtm prep --recipe r.yaml --out out --no-progress --stage reduce"
    env.pop("SLURM_ARRAY_TASK_ID")
    res = subprocess.run(["bash", str(SBATCH), "map", "r.yaml", "out"], env=env, capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: SLURM_ARRAY_TASK_ID is not set")


@pytest.mark.slow
def test_real_array_run_equals_local(corpus, slurm_cluster, tmp_path):
    recipe, local = corpus
    out = tmp_path / "out"
    env = dict(slurm_cluster.env,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), slurm_cluster.env["PATH"]]))
    res = subprocess.run([sys.executable, "-m", "data_prep", "--recipe", str(recipe), "--out", str(out),
                          "--no-progress", "--executor", "slurm", "--shards-per-task", "2",
                          "--sbatch-arg=--mem=200M", *RECIPE_OVERRIDES],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = json.loads(res.stdout.strip().splitlines()[-1])
    states = {job: [r.get("JobState") for r in slurm_cluster.wait(job)]
              for job in (jobs["array_job"], jobs["reduce_job"])}
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("sgtm-prep-*.out"))
    assert all(s == "COMPLETED" for v in states.values() for s in v), f"{states}\n{logs}"
    assert len(states[jobs["array_job"]]) == math.ceil(jobs["shards"] / 2)
    assert tree(out) == tree(local)
