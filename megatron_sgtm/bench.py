"""``sgtm bench``: the CPU benchmarks, each a ratio measured within one run, plus prep speed.

Runs the scripts under ``bench/`` of a source checkout one after another (never in parallel:
they would time each other) and prints their result lines and a summary.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCHES = {
    "overhead": ("sgtm_overhead.py", "SGTM on vs masking off, same model, same run",
                 ("ratio", "machine")),
    "tp": ("train_throughput.py", "tokens/s at TP=2 vs TP=1 (tiny config)", ("ratio", "tok")),
    "prep": ("prep_speed.py", "data prep MB/s end to end (classify + tokenize + write)",
             ("MB/s", "machine")),
    "integrity": ("checkpoint_integrity.py", "checkpoint sha256 + pickle checks vs save/load",
                  ("ratio",)),
}


def bench_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sgtm bench", description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append",
                        help="run only these benchmarks (repeatable)")
    args = parser.parse_args(argv)
    root = bench_dir()
    if not root.is_dir():
        print(f"error: benchmark scripts not found at {root} (run from a source checkout)",
              file=sys.stderr)
        return 2
    summary, failed = [], False
    for name in args.only or list(BENCHES):
        script, what, keys = BENCHES[name]
        path = root / script
        if not path.is_file():
            summary.append(f"{name:<9} missing: {path}")
            failed = True
            continue
        print(f"== {name}: {what}", flush=True)
        proc = subprocess.run([sys.executable, str(path)], cwd=root.parent, text=True,
                              capture_output=True, env=dict(os.environ))
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        print("\n".join(lines), flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            summary.append(f"{name:<9} FAILED (exit {proc.returncode})")
            failed = True
            continue
        picked = [line for line in lines if any(k in line for k in keys)]
        summary.append(f"{name:<9} " + (" | ".join(picked[-2:]) if picked else lines[-1]))
    print("\nsummary:")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
