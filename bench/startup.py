"""Start-up cost of `sgtm train` against the size of the shards: time to the first step, and
bytes read from storage per rank at start, with the shard files evicted from the page cache
and everything else warm.

    python bench/startup.py [--sizes 0.1,1,4] [--nproc 1,2] [--work DIR] [--source DIR]
                            [--file-mb 256] [--json PATH] [--keep]

Shards: a real `sgtm prep` of the bilingual recipe (or ``--source DIR``), replicated to each
size through `sgtm prep --merge` (the source's shards listed many times over, merged into
files of about ``--file-mb``), under ``--work`` (default: a temporary folder, removed after
unless ``--keep``). The free space needed is checked first.

Per size, a first run builds the packing cache (the first start of a corpus; timed, not the
figure); then, per rank count, a restart with every file of the shard directory evicted from
the page cache (fsync + ``posix_fadvise(POSIX_FADV_DONTNEED)``): `sgtm train` (1 step, tiny
model at sequence length 1024, no checkpoint, no evaluation) is launched and each rank's
``startup.jsonl`` record gives its seconds to the first step and its ``/proc/self/io``
``read_bytes`` at that point. The launcher's own checks (the preflight, once per node) run
before the ranks and warm the cache for them, so its reads are measured apart, in this
process, after another eviction; ``cold rank bound`` = preflight + every rank's reads, the
union of what the node read, which bounds what any one rank reads on a node of its own.
``1-step job`` is everything the `sgtm train` process tree read until it exited (the
measure of "a 1-step run read N MB": start, the step's own reads, exit).

Targets: cold rank bound <= 1% of the shard bytes plus the index-sized files (.idx, the
per-document .npy, the manifest); time to the first step at the largest size within 1.2x of
the smallest, per rank count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prep_speed import machine  # noqa: E402  (bench/ is on the path when run as a script)

TINY = ROOT / "configs/train/tiny_cpu.yaml"
SEQ = 1024
HEADROOM = 1.1  # free space needed: sizes x this


def prep_source(work: Path) -> Path:
    out = work / "source"
    if not (out / "manifest.json").is_file():
        run([sys.executable, "-m", "megatron_sgtm.cli", "prep", "--recipe",
             str(ROOT / "configs/data/bilingual.yaml"), "--out", str(out), "--no-progress",
             "--workers", "2"])
    return out


def run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return proc


def replicate(source: Path, out: Path, gb: float, file_mb: float) -> dict:
    """``out``: about ``gb`` GB of train shards, the source's shards repeated and merged."""
    from data_prep.merge import merge_directory

    src = json.loads((source / "manifest.json").read_text())
    shards = src["splits"]["train"]["shards"]
    per_copy = sum(r["bytes"] for e in shards for r in e["files"].values())
    copies = max(1, math.ceil(gb * 1e9 / per_copy))
    listing = out.with_name(out.name + ".listing")  # symlinks: the copies cost no space
    shutil.rmtree(listing, ignore_errors=True)
    (listing / "train").mkdir(parents=True)
    entries = []
    for c in range(copies):
        for e in shards:
            prefix = f"train/c{c:05d}-{Path(e['prefix']).name}"
            files = {}
            for name, rec in e["files"].items():
                new = prefix + name[len(e["prefix"]):]
                (listing / new).symlink_to(source / name)
                files[new] = rec
            entries.append({**e, "prefix": prefix, "files": files})
    for p in [source / "tokenizer.model", *source.glob("test_*")]:
        (listing / p.name).symlink_to(p)
    manifest = json.loads(json.dumps(src))
    manifest["splits"]["train"]["shards"] = entries
    (listing / "manifest.json").write_text(json.dumps(manifest))
    per_file = max(1, round(file_mb * 1e6 / (per_copy / len(shards))))
    shutil.rmtree(out, ignore_errors=True)
    merge_directory(listing, out, shards_per_file=per_file)
    shutil.rmtree(listing)
    return {"copies": copies, "shards_per_file": per_file}


def file_bytes(d: Path) -> dict:
    """Bytes of the shard directory by kind: the .bin files, and the index-sized files a start
    reads whole (.idx, the per-document .npy, the manifest)."""
    out = {"bin": 0, "index": 0}
    for p in d.rglob("*"):
        if p.is_file() and ".packing_cache" not in p.parts and ".prep" not in p.parts \
                and p.name != "tokenizer.model":
            out["bin" if p.suffix == ".bin" else "index"] += p.stat().st_size
    return out


def overrides(data: Path, run_dir: Path) -> list[str]:
    return [f"data.dir={data}", "checkpoint.dir=", f"logging.run_dir={run_dir}", "train.steps=1",
            "train.log_every=1", "train.eval_every=0", "data.eval_batches=0", "logging.wandb=off",
            "logging.progress_bar=false", f"model.seq_length={SEQ}"]


def train_once(data: Path, run_dir: Path, nproc: int) -> dict:
    """`sgtm train`, 1 step: the ranks' start-up record, the seconds from the launch to the
    first step, and what the whole job read (launcher and ranks, start to exit: the
    ``ru_inblock`` of the finished process tree)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_sgtm.cli", "train", "--config", str(TINY), "--nproc",
           str(nproc), *overrides(data, run_dir)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"failed ({status}): {' '.join(cmd)}\n{err[-3000:]}")
    record = json.loads((run_dir / "startup.jsonl").read_text().splitlines()[-1])
    return {"first_step_s": record["time"] - t0, "rank_read_bytes": record["read_bytes"],
            "rank_seconds": record["seconds"], "job_read_bytes": usage.ru_inblock * 512}


def preflight_cold(data: Path, nproc: int) -> dict:
    from megatron_sgtm.process_io import ReadMeter, evict
    from megatron_sgtm.train.cli import preflight
    from megatron_sgtm.train.config import load_experiment

    cfg = load_experiment(str(TINY), overrides(data, data.parent / "unused"))
    evict([data])
    meter = ReadMeter()
    preflight(cfg, nproc)
    return {"preflight_read_bytes": meter.bytes, "preflight_s": meter.seconds}


def measure(data: Path, work: Path, nprocs: list[int]) -> list[dict]:
    from megatron_sgtm.process_io import evict

    sizes = file_bytes(data)
    first = train_once(data, work / "run", 1)  # builds the packing cache
    rows = []
    for nproc in nprocs:
        row = {"nproc": nproc, **sizes, "first_start_s": first["first_step_s"],
               **preflight_cold(data, nproc)}
        evict([data])
        row.update(train_once(data, work / "run", nproc))
        row["cold_rank_bound"] = row["preflight_read_bytes"] + sum(row["rank_read_bytes"])
        row["budget"] = 0.01 * (sizes["bin"] + sizes["index"]) + sizes["index"]
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.1,1,4", help="GB of shards, comma-separated")
    ap.add_argument("--nproc", default="1,2", help="rank counts, comma-separated")
    ap.add_argument("--work", help="folder for the shards (default: a temporary one)")
    ap.add_argument("--source", help="a finished `sgtm prep` directory to replicate "
                                     "(default: prep the bilingual recipe)")
    ap.add_argument("--file-mb", type=float, default=256, help="size of each merged train file")
    ap.add_argument("--json", help="write the rows here (default: $OUT/startup.json when $OUT is set)")
    ap.add_argument("--keep", action="store_true", help="keep --work's shards afterwards")
    a = ap.parse_args()
    sizes = [float(s) for s in a.sizes.split(",")]
    nprocs = [int(n) for n in a.nproc.split(",")]
    work = Path(a.work or tempfile.mkdtemp(prefix="sgtm_startup_"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < HEADROOM * sum(sizes) * 1e9:
        sys.exit(f"{work}: {free / 1e9:.1f} GB free, the sizes need {HEADROOM * sum(sizes):.1f} GB "
                 "(pass --work on a larger disk, or smaller --sizes)")
    print(f"machine: {machine()}, load {os.getloadavg()[0]:.1f}")
    print(f"page cache: every file of the shard directory evicted before each measured start "
          f"(fsync + posix_fadvise DONTNEED); reads are /proc/self/io read_bytes")
    source = Path(a.source) if a.source else prep_source(work)
    rows = []
    try:
        for gb in sizes:
            data = work / f"shards-{gb:g}GB"
            info = replicate(source, data, gb, a.file_mb)
            for row in measure(data, work, nprocs):
                rows.append({"gb": gb, **info, **row})
    finally:
        if not a.keep and not a.source and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'shards':>8} {'ranks':>5} {'bin MB':>9} {'index MB':>9} {'preflight MB':>12} "
          f"{'per rank MB':>14} {'cold bound MB':>13} {'budget MB':>9} {'1-step job MB':>13} "
          f"{'first step s':>12} {'first start s':>13}")
    for r in rows:
        ranks = "/".join(f"{b / 1e6:.2f}" for b in r["rank_read_bytes"])
        print(f"{r['gb']:>6g}GB {r['nproc']:>5} {r['bin'] / 1e6:>9.1f} {r['index'] / 1e6:>9.1f} "
              f"{r['preflight_read_bytes'] / 1e6:>12.2f} {ranks:>14} {r['cold_rank_bound'] / 1e6:>13.2f} "
              f"{r['budget'] / 1e6:>9.2f} {r['job_read_bytes'] / 1e6:>13.1f} {r['first_step_s']:>12.1f} "
              f"{r['first_start_s']:>13.1f}")
    for nproc in nprocs:
        mine = [r for r in rows if r["nproc"] == nproc]
        if len(mine) > 1:
            print(f"time to first step, {nproc} rank(s): {mine[-1]['gb']:g} GB / {mine[0]['gb']:g} GB "
                  f"= {mine[-1]['first_step_s'] / mine[0]['first_step_s']:.2f} (target <= 1.2)")
    ok = all(r["cold_rank_bound"] <= r["budget"] for r in rows)
    print(f"cold rank bound within 1% of shard bytes + index files: {'yes' if ok else 'NO'}")
    path = a.json or (Path(os.environ["OUT"]) / "startup.json" if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
