"""The results table: one row per run of the spec, with its status (done / failed / pending)."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from .runner import Context
from .spec import RunSpec

FIRST = ["run_id", "status", "kind", "size", "tokens", "method", "base_method", "rate", "seed", "forget_share",
         "retain_loss", "forget_loss", "adjacent_loss", "retain_loss_raw", "forget_loss_raw",
         "adjacent_loss_raw", "generation_rate", "params", "non_embedding_params",
         "active_non_embedding_params", "tokens_trained",
         "steps", "flops", "forget_tokens_seen", "undiscovered_tokens_seen", "train_seconds",
         "eval_seconds", "error"]


def collect(ctx: Context, runs: list[RunSpec]) -> list[dict]:
    rows = []
    for run in runs:
        rdir = ctx.run_dir(run)
        if (rdir / "result.json").exists():
            row = json.loads((rdir / "result.json").read_text())
        elif (rdir / "error.txt").exists():
            last = (rdir / "error.txt").read_text().strip().splitlines()[-1:] or ["?"]
            row = run.to_dict() | {"status": "failed", "error": f"{last[0]} ({rdir / 'error.txt'})"}
        else:
            row = run.to_dict() | {"status": "pending"}
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = FIRST + sorted({k for r in rows for k in r if k not in FIRST})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, sort_keys=True, default=float) + "\n" for r in rows))
    tmp.replace(path)


def status_counts(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out
