"""The benchmark scripts run end to end (CPU smoke mode); they report, tests never time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(tmp_path))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_gpu_bench_smoke_mode_on_cpu(tmp_path):
    # The trainer's step for SGTM on / masking off, the reference, and the plain-loop fallback
    # (a row appears only when it ran: a failing trainer step would add an error row too).
    proc = _run(["bench/gpu.py", "--tiny", "--device", "cpu", "--no-compile", "--steps", "1",
                 "--warmup", "1", "--variants",
                 "SGTM on,masking off,reference,SGTM on (plain loop)"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    variants = {row["variant"]: row for row in data["rows"]}
    assert set(variants) == {"SGTM on", "masking off", "reference", "SGTM on (plain loop)"}
    assert all(row["tokens_per_s"] > 0 for row in variants.values())
    # Same architecture and width: our model and the reference have the same parameter count.
    assert variants["SGTM on"]["params"] == variants["reference"]["params"]
    assert "vs ref" in proc.stdout and "SGTM on / masking off step time" in proc.stdout


def test_checkpoint_integrity_bench_prints_its_ratios(tmp_path):
    proc = _run(["bench/checkpoint_integrity.py", "--layers", "1", "--hidden", "64", "--vocab",
                 "256", "--repeats", "1", "--threads", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "machine:" in proc.stdout and proc.stdout.count("ratio") == 2
    data = json.loads((tmp_path / "checkpoint_integrity.json").read_text())
    assert data["files"] >= 5 and data["ratios"]["verify/load"] > 0


@pytest.mark.parametrize("path", ["sequences", "tokens"])
def test_overhead_bench_prints_a_ratio(tmp_path, path):
    proc = _run(["bench/sgtm_overhead.py", "--layers", "1", "--hidden", "64", "--seq", "16",
                 "--batch", "4", "--steps", "2", "--threads", "1", "--path", path,
                 "--profile"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-time ratio" in proc.stdout and "machine:" in proc.stdout
    assert f"masking path: {path}" in proc.stdout
    # The profile: per-op medians of alternating steps, a category table and the top ops.
    assert "per-op medians of 5 alternating profiled steps" in proc.stdout
    assert "aten::mm" in proc.stdout.split("top 15 ops")[1]


@pytest.mark.slow
def test_prep_scale_bench_prints_its_machine_and_ratios(tmp_path):
    proc = _run(["bench/prep_scale.py", "--smoke", "--sizes", "0.002,0.004", "--file-mb", "1",
                 "--shard-mb", "0.5"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "machine:" in out and "replicated" in out and "seeded shuffle" in out
    assert "2 workers / 1 worker throughput" in out and "peak RSS per worker" in out
    data = json.loads((tmp_path / "prep_scale.json").read_text())
    assert {(r["size_gb"], r["workers"]) for r in data["rows"]} == {(0.002, 1), (0.002, 2), (0.004, 1), (0.004, 2)}
    assert all(r["mb_s"] > 0 and r["peak_rss_per_worker"] > 0 for r in data["rows"])


@pytest.mark.slow
def test_prep_speed_bench_one_row_per_classifier_kind(tmp_path):
    pytest.importorskip("fasttext", reason="the classifiers extra (fasttext-numpy2-wheel) is not installed")
    proc = _run(["bench/prep_speed.py", "--classifier", "cascade", "--classifier", "python", "--workers", "2",
                 "max_docs=300", "split.max_test_docs=20", "tokenizer.kind=bpe", "tokenizer.vocab_size=600",
                 "tokenizer.max_train_bytes=150000"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "machine:" in proc.stdout and "built: fastText model" in proc.stdout
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| kind")}
    assert set(rows) == {"cascade", "python"}
    for cells in rows.values():  # docs/s and MB/s per core, wall seconds, classifier alone
        assert all(float(c.replace(",", "")) > 0 for c in cells)
