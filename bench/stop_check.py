"""What the all-rank preemption check costs: tiny-config training tokens/s with the check every
step (the default, ``resilience.stop_check_every=1``) vs. effectively never, in one run.

Usage: python bench/stop_check.py [--steps 60] [--nproc 2] [--tp 2]
Both runs are `sgtm train`'s torchrun entry point on the same shards, model and batch. The
check is one all-reduce of two int64 on a gloo group (CPU tensors, also under NCCL), so this
ratio on CPU is an upper bound of its share of a step: a GPU step is longer and the check
does not wait for the GPU. Prints the machine, both rates, the ratio, and the check's latency
per step derived from them.
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
NEVER = 10**9  # a check every 10^9 steps: none in this run


def run(shards: Path, run_dir: Path, nproc: int, tp: int, steps: int, every: int) -> float:
    overrides = [f"data.dir={shards}", f"logging.run_dir={run_dir}", "checkpoint.dir=",
                 f"tensor_parallel={tp}", f"train.steps={steps}", "train.log_every=5",
                 "train.eval_every=0", "data.eval_batches=0", "logging.progress_bar=false",
                 "logging.wandb=off", f"resilience.stop_check_every={every}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megatron_sgtm.train",
           "--config", str(ROOT / "configs/train/tiny_cpu.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"run failed (stop_check_every={every}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates)  # the first window holds start-up costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    from megatron_sgtm.data.testing import write_sample_shards

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_sample_shards(shards, n_train=300, n_test=10)
        never = run(shards, Path(tmp) / "never", args.nproc, args.tp, args.steps, NEVER)
        every = run(shards, Path(tmp) / "every", args.nproc, args.tp, args.steps, 1)
    tokens_per_step = 16 * 64  # tiny_cpu.yaml: global batch 16 x seq 64
    extra_ms = (tokens_per_step / every - tokens_per_step / never) * 1e3
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, load {os.getloadavg()[0]:.1f}")
    print(f"{args.nproc} processes, TP={args.tp}, tiny config, {args.steps} steps")
    print(f"stop check never:      {never:,.0f} tokens/s ({tokens_per_step / never * 1e3:.2f} ms/step)")
    print(f"stop check every step: {every:,.0f} tokens/s ({tokens_per_step / every * 1e3:.2f} ms/step)")
    print(f"every / never tokens/s ratio: {every / never:.3f} ({extra_ms:+.2f} ms per step)")


if __name__ == "__main__":
    main()
