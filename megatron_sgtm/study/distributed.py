"""Study runs of sizes with ``gpus > 1``: `sgtm train` under torchrun instead of the
in-process single-rank trainer.

The run's config is written to ``RUN_DIR/train_config.json`` (the size's architecture and
parallelism, the method entry's routing, the study's schedule) and trains on the run's
relabelled shards with ``data.method`` = the base method, so `sgtm train` selects and labels
the documents itself (its own packing and order, not ``study/data.py``'s). Its checkpoints go
to ``RUN_DIR/ckpt`` and it resumes from them, so a preempted study task continues. The final
checkpoint is then loaded at TP 1 and saved as the run's ``model.pt``, and evaluation is the
same as for every other run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..routing import FORGET, LABEL_NAMES
from .spec import RunSpec, StudySpec, entry_of, size_by_name

Log = Callable[[str], None]
DATA_METHOD = {"no_filter": "none"}  # study base method -> sgtm train's data.method


def experiment_dict(spec: StudySpec, ctx, run: RunSpec) -> dict:
    """The `sgtm train` config of one run (JSON, which YAML reads)."""
    from .engine import core_config

    size, entry = size_by_name(spec, run.size), entry_of(spec, run)
    core = core_config(size, ctx.vocab, spec.train.seq_length, entry)
    t = spec.train
    dp = size.gpus // size.tensor_parallel
    steps = t.steps_for(run.tokens)
    rdir = ctx.run_dir(run)
    return {
        "model": asdict(core.model), "partition": asdict(core.partition),
        "routing": asdict(core.routing), "tensor_parallel": size.tensor_parallel,
        "data": {"dir": str(ctx.shards_for(run, entry)),
                 "method": DATA_METHOD.get(run.base_method, run.base_method), "eval_batches": 0},
        "train": {"seed": run.seed, "micro_batch_size": t.micro_batch_size or t.batch_size // dp,
                  "global_batch_size": t.batch_size, "steps": steps, "lr": t.lr,
                  "min_lr": t.lr * t.min_lr_ratio, "warmup_steps": int(t.warmup_fraction * steps),
                  "weight_decay": t.weight_decay, "grad_clip": t.grad_clip,
                  "log_every": max(1, steps // t.curve_points), "threads": t.threads},
        # About ten saves per run: a preempted task loses at most a tenth of its run.
        "checkpoint": {"dir": str(rdir / "ckpt"), "save_every": max(1, steps // 10),
                       "keep_last": 1, "resume": "auto"},
        "logging": {"wandb": "off", "progress_bar": False, "run_name": run.run_id},
    }


def command(cfg_path: Path, gpus: int) -> list[str]:
    return [sys.executable, "-m", "megatron_sgtm.cli", "train", "--nproc", str(gpus),
            "--config", str(cfg_path)]


def _last_counts(metrics: Path) -> dict:
    """The last logged record (cumulative label counters) and the train-loss curve."""
    last, curve = {}, []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec and "tokens_seen" in rec:
                last = rec
                curve.append({"step": rec["step"], "tokens": rec["tokens_seen"],
                              "train_loss": rec["loss"]})
    return {"last": last, "curve": curve}


def train_distributed(spec: StudySpec, ctx, run: RunSpec, log: Log) -> tuple[object, dict]:
    """(trained model at TP 1, train.json info) of a run trained by `sgtm train`."""
    from ..post import ckpt_io

    size = size_by_name(spec, run.size)
    rdir = ctx.run_dir(run)
    cfg_path = rdir / "train_config.json"
    cfg = experiment_dict(spec, ctx, run)
    cfg_path.write_text(json.dumps(cfg, indent=1))
    cmd = command(cfg_path, size.gpus)
    log(f"{run.run_id}: " + " ".join(cmd))
    start = time.time()
    with open(rdir / "train.log", "a") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = (rdir / "train.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"sgtm train exited {rc} ({rdir / 'train.log'}):\n" + "\n".join(tail))
    model, _, _ = ckpt_io.load(rdir / "ckpt", tensor_parallel=1)
    counts = _last_counts(rdir / "ckpt" / "metrics.jsonl")
    last = counts["last"]
    t = spec.train
    steps = cfg["train"]["steps"]
    forget = [f"true_forget->{name}" for name in LABEL_NAMES.values()]
    info = {"steps": steps, "tokens": steps * t.batch_size * t.seq_length,
            "tokens_per_label": {str(i): last.get(f"tokens/{n}") for i, n in LABEL_NAMES.items()},
            "forget_tokens_seen": sum(last.get(k, 0) for k in forget),
            # Forget-domain tokens trained under any label but the forget one.
            "undiscovered_tokens_seen": sum(last.get(f"true_forget->{n}", 0)
                                            for i, n in LABEL_NAMES.items() if i != FORGET),
            "seconds": time.time() - start, "curve": counts["curve"],
            "trainer": "sgtm train", "gpus": size.gpus, "tensor_parallel": size.tensor_parallel}
    return model, info
