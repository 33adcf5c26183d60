"""bench/train_throughput.py runs end to end and prints its ratio (numbers are reported, not
asserted)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_bench_prints_machine_and_ratio():
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--steps", "6"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "machine:" in proc.stdout and "TP=2 / TP=1 tokens/s ratio:" in proc.stdout
