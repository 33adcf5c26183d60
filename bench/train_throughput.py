"""Training tokens/s of the tiny config at TP=1 (one process) vs TP=2 (two processes), one run.

Usage: python bench/train_throughput.py [--steps 40] [--config configs/train/tiny_cpu.yaml]
Both runs use the same model, global batch and shards (real text from the data test writer),
each launched through torchrun like a user run. Prints the machine, both rates and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, shards: Path, run_dir: Path, tp: int, steps: int, extra: list[str]) -> float:
    overrides = [f"data.dir={shards}", f"logging.run_dir={run_dir}", "checkpoint.dir=",
                 f"tensor_parallel={tp}", f"train.steps={steps}", "train.log_every=5",
                 "train.eval_every=0", "data.eval_batches=0", "logging.progress_bar=false",
                 "logging.wandb=off", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={tp}", "-m", "megatron_sgtm.train", "--config", config, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"TP={tp} run failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates)  # the first window holds start-up costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs/train/tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    from megatron_sgtm.data.testing import write_sample_shards

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_sample_shards(shards, n_train=300, n_test=10)
        tp1 = run(args.config, shards, Path(tmp) / "tp1", 1, args.steps, args.overrides)
        tp2 = run(args.config, shards, Path(tmp) / "tp2", 2, args.steps, args.overrides)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, load {os.getloadavg()[0]:.1f}")
    print(f"TP=1 (1 process):  {tp1:,.0f} tokens/s")
    print(f"TP=2 (2 processes): {tp2:,.0f} tokens/s")
    print(f"TP=2 / TP=1 tokens/s ratio: {tp2 / tp1:.2f}")


if __name__ == "__main__":
    main()
