"""Raw-text throughput of `sgtm prep`, end to end: read, classify, tokenize, write.

A warm-up run pays the one-off costs first: importing megatron-core, training the
tokenizer (bounded by tokenizer.max_train_bytes) and unpacking the language-ID model
(cached per process). The timed run then gets the trained tokenizer and measures the
per-corpus work that scales with data size. Both times are printed, with the machine.

    python bench/prep_speed.py [--recipe configs/data/bilingual.yaml] [--workers N] [key=value ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers count once reaped
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> str:
    from megatron_sgtm.machine import cpu_model

    return f"{platform.node()}: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "configs/data/bilingual.yaml"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost is not prep work)

    from data_prep.corpus import load_corpus
    from data_prep.pipeline import prepare
    from data_prep.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(a.recipe, a.overrides)
        t0 = time.perf_counter()
        prepare(recipe, Path(tmp) / "warm", workers=a.workers, progress=False, log=lambda m: None)
        warm = time.perf_counter() - t0
        tok = str(Path(tmp) / "warm" / "tokenizer.model")
        recipe = load_recipe(a.recipe, a.overrides + [f"tokenizer.model={tok}"])
        mb = sum(len(t.encode("utf-8")) for t in load_corpus(recipe).texts) / 1e6
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        prepare(recipe, Path(tmp) / "timed", workers=a.workers, progress=False, log=lambda m: None)
        dt = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
    print(f"machine: {machine()}")
    print(f"recipe: {Path(a.recipe).name} ({recipe.classifier.kind} classifier), workers {a.workers}")
    print(f"prep: {mb:.2f} MB raw text in {dt:.2f} s = {mb / dt:.2f} MB/s end to end "
          "(read + classify + tokenize + write)")
    print(f"warm-up run (tokenizer training + one-off loads): {warm:.2f} s")
    # Wall-clock MB/s depends on what else the machine runs; CPU time does not.
    print(f"cpu: {cpu:.2f} CPU-seconds (main + workers) = {mb / cpu:.2f} MB per CPU-second; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
