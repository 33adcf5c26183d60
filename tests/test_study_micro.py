"""`sgtm study` end to end on a micro-study (2 sizes, 2 methods, a few steps each): the results
table, the fit, leakage, plots, skip-on-rerun, failure reporting and the SLURM task entry."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from megatron_sgtm.study.analysis import fit_scaling, leakage_rows
from megatron_sgtm.version import version_string
from megatron_sgtm.study.cli import main

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "configs/studies/micro.yaml")
PLOTS = ["tradeoff.png", "loss_curves.png", "leakage.png", "penalty.png", "scaling.png", "attack.png"]


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro") / "study"
    assert main([MICRO, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_table_fit_leakage_and_plots(study):
    rows = _rows(study)
    # 2 sizes x (no_filter + sgtm at one rate) + 3 leakage baselines
    assert len(rows) == 7 and {r["status"] for r in rows} == {"done"}
    main_rows = [r for r in rows if r["kind"] == "main"]
    assert {(r["size"], r["method"]) for r in main_rows} == {
        (s, m) for s in ("s16", "s32") for m in ("no_filter", "sgtm")}
    for r in rows:
        assert math.isfinite(float(r["retain_loss"])) and math.isfinite(float(r["forget_loss"]))
        assert 0.0 <= float(r["generation_rate"]) <= 1.0
        assert int(r["tokens_trained"]) == int(r["steps"]) * 16 * 32
        assert r["sgtm_version"] == version_string()
    # SGTM runs at undiscovered rate 0.1 see some undiscovered forget tokens, fewer than all.
    sgtm = [r for r in main_rows if r["method"] == "sgtm"]
    nf = {r["size"]: r for r in main_rows if r["method"] == "no_filter"}
    for r in sgtm:
        assert 0 < int(r["undiscovered_tokens_seen"]) < int(r["forget_tokens_seen"])
        assert int(nf[r["size"]]["undiscovered_tokens_seen"]) == int(nf[r["size"]]["forget_tokens_seen"])
    analysis = json.loads((study / "analysis.json").read_text())
    fit = analysis["fits"]["retain"]
    assert len(fit["points"]) == 2 and math.isfinite(fit["b"]) and fit["a"] > 0
    # A 2-point fit passes through both points exactly.
    for c, loss in fit["points"]:
        assert fit["a"] * c ** (-fit["b"]) == pytest.approx(loss, rel=1e-6)
    leak = {e["run_id"]: e for e in analysis["leakage"]}
    s16 = next(k for k in leak if k.startswith("s16"))
    assert "leakage" in leak[s16] or "error" in leak[s16]
    assert "no leakage baseline" in leak[next(k for k in leak if k.startswith("s32"))]["error"]
    assert {e["method"] for e in analysis["attack"]} == {"sgtm"}
    for name in PLOTS:
        assert (study / "plots" / name).stat().st_size > 1000, name
    report = (study / "report.txt").read_text()
    assert "scaling law" in report and "compute penalty" in report


@pytest.mark.slow
def test_rerun_skips_finished_and_reports_failures(study, capsys):
    before = _mtimes(study)
    assert len(before) == 7
    assert main([MICRO, "--out", str(study)]) == 0
    assert _mtimes(study) == before  # nothing re-ran
    # Break one run's recorded training output: its evaluation fails, is reported, and the
    # other runs stay done.
    victim = sorted(before)[0]
    rdir = study / "runs" / victim
    (rdir / "result.json").unlink()
    (rdir / "model.pt").write_bytes(b"not a checkpoint")
    assert main([MICRO, "--out", str(study)]) == 1
    rows = {r["run_id"]: r for r in _rows(study)}
    assert rows[victim]["status"] == "failed" and "error.txt" in rows[victim]["error"]
    assert sum(r["status"] == "done" for r in rows.values()) == 6
    assert (rdir / "error.txt").exists()
    assert f"FAILED {victim}" in (study / "report.txt").read_text()
    # Once the bad output is gone, a re-run retrains only that run and clears the error.
    (rdir / "model.pt").unlink()
    (rdir / "train.json").unlink()
    assert main([MICRO, "--out", str(study), "--task-index",
                 str(_task_index(study, victim))]) == 0
    assert not (rdir / "error.txt").exists()
    assert main([MICRO, "--out", str(study), "--analyze"]) == 0
    after = _mtimes(study)
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in before.items() if k != victim}


def _task_index(out: Path, run_id: str) -> int:
    runs = json.loads((out / "spec.json").read_text())["runs"]
    return [r["run_id"] for r in runs].index(run_id)


def test_bad_spec_and_task_index_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethods: [sgtm, magic]\nbogus: 1\n")
    assert main([str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "magic" in err and "bogus" in err
    bad.write_text("name: x\nundiscovered_rates: [1.5]\n")
    assert main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "1.5" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.yaml")]) == 2


def test_fit_and_leakage_math_on_known_rows():
    # Rows on an exact power law l = 9 C^-0.05: the fit recovers it.
    rows = [{"status": "done", "kind": "main", "method": "no_filter", "flops": c,
             "retain_loss": 9 * c ** -0.05} for c in (1e9, 1e10, 1e11)]
    fit = fit_scaling(rows)["retain"]
    assert fit["a"] == pytest.approx(9, rel=1e-6) and fit["b"] == pytest.approx(0.05, rel=1e-6)
    # Leakage: baselines at 0 / 1000 forget tokens with forget loss 6 / 4; an SGTM run with
    # forget loss 5.5 that saw 2500 undiscovered tokens leaked 250 equivalent tokens -> 0.1.
    series = [{"status": "done", "kind": "leakage", "size": "a", "tokens": 1, "method": "no_filter",
               "forget_tokens_seen": t, "forget_loss_raw": l} for t, l in ((0, 6.0), (1000, 4.0))]
    run = {"status": "done", "kind": "main", "size": "a", "tokens": 1, "method": "sgtm", "rate": 0.1,
           "seed": 0, "run_id": "r", "forget_loss_raw": 5.5, "undiscovered_tokens_seen": 2500}
    (entry,) = leakage_rows(series + [run])
    assert entry["leakage"] == pytest.approx(0.1)


@pytest.mark.slow
def test_slurm_array_script_runs_its_task(study, tmp_path):
    """The sbatch script is plain bash: run it as SLURM would, with the array index set."""
    import os
    import subprocess
    import sys

    script = ROOT / "launch/slurm_study_array.sbatch"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("SLURM_ARRAY_TASK_ID", None)
    res = subprocess.run(["bash", str(script), MICRO, str(study)], env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "SLURM_ARRAY_TASK_ID" in res.stderr
    env["SLURM_ARRAY_TASK_ID"] = "1"
    before = _mtimes(study)
    res = subprocess.run(["bash", str(script), MICRO, str(study)], env=env, capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert _mtimes(study) == before  # task 1 was finished already: skipped
