"""One study run, in stages whose recorded outputs make a re-run skip them.

    RUN_DIR/model.pt + train.json   training finished (model, counters, loss curve)
    RUN_DIR/result.json             evaluation finished: the run is done
    RUN_DIR/error.txt               the last attempt failed (traceback); removed on success

Evaluation: ablate (routing methods), plain losses, logit calibration, calibrated losses,
generation-based capability rate, optional adversarial fine-tuning — all via megatron_sgtm.post.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import data as sdata
from .compute import param_count, train_flops
from ..version import version_string
from .spec import ABLATED, MethodSpec, RunSpec, StudySpec, entry_of, size_by_name

Log = Callable[[str], None]


@dataclass
class Context:
    """Where a study's data and runs live; shared by every run."""

    out: Path
    base_shards: Path
    vocab: int
    eod_id: int

    def run_dir(self, run: RunSpec) -> Path:
        return self.out / "runs" / run.run_id

    def shards_for(self, run: RunSpec, entry: Optional[MethodSpec] = None) -> Path:
        """The shards a run trains on: the base ones for label-free methods, else the copy
        relabelled at the run's rate (and its method's own retain-mode share, if set)."""
        if run.rate is None:
            return self.base_shards  # label-free methods ignore the labels
        return sdata.rate_dir(self.base_shards, run.rate,
                              None if entry is None else entry.retain_mode_share)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=float))
    tmp.replace(path)


@lru_cache(maxsize=8)
def _docs(shard_dir: str, split: str):
    return sdata.read_docs(Path(shard_dir), split)


@lru_cache(maxsize=16)
def _eval_rows(shard_dir: str, split: str, seq: int, limit: Optional[int]):
    return sdata.eval_split(Path(shard_dir), split, seq, limit)


@lru_cache(maxsize=4)
def _train_by_truth(shard_dir: str, truth: int, seq: int, limit: int):
    return sdata.by_truth(_docs(shard_dir, "train"), truth, seq, seed=1, limit=limit)


@lru_cache(maxsize=2)
def _classifier(shard_dir: str):
    """The data-prep classifier family for the forget domain: texts -> scores in [0, 1]."""
    from ..post.generation import recipe_classifier

    manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
    own = recipe_classifier(manifest)
    if own is not None:
        return own
    # Topic recipes: refit the TF-IDF classifier on decoded training documents.
    import sentencepiece as spm

    from data_prep.classifiers import TopicScorer
    from data_prep.recipe import recipe_from_dict

    sp = spm.SentencePieceProcessor(model_file=str(Path(shard_dir) / "tokenizer.model"))
    docs = _docs(shard_dir, "train")
    pick = np.random.default_rng(0).permutation(len(docs.tokens))[:3000]
    texts = [sp.decode(docs.tokens[i].tolist()) for i in pick]
    scorer = TopicScorer(recipe_from_dict(manifest["recipe"]).classifier).fit(
        texts, docs.truth[pick] == sdata.TRUTH_FORGET)
    return scorer.score


def _save_model(model, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, tmp)
    tmp.replace(path)


def _load_model(spec: StudySpec, ctx: Context, run: RunSpec, path: Optional[Path]):
    import torch

    from ..model import build_model
    from .engine import core_config

    size = size_by_name(spec, run.size)
    core = core_config(size, ctx.vocab, spec.train.seq_length, entry_of(spec, run))
    # A fresh model starts from the run's seed (the same initial weights at every layout).
    model = build_model(core, seed=run.seed)
    if path is not None:
        state = torch.load(path, weights_only=True, map_location="cpu")
        res = model.load_state_dict(state, strict=False)
        # Only megatron's TE "_extra_state" buffers are left out of the saved file.
        bad = [k for k in res.missing_keys if not k.endswith("_extra_state")] + list(res.unexpected_keys)
        if bad:
            raise RuntimeError(f"{path}: does not match the run's model (keys {bad[:4]})")
    return model


def train_stage(spec: StudySpec, ctx: Context, run: RunSpec, log: Log) -> dict:
    rdir = ctx.run_dir(run)
    if (rdir / "train.json").exists() and (rdir / "model.pt").exists():
        log(f"{run.run_id}: training done earlier, reusing")
        return json.loads((rdir / "train.json").read_text())
    if size_by_name(spec, run.size).gpus > 1:
        from .distributed import train_distributed

        model, info = train_distributed(spec, ctx, run, log)
    else:
        model, info = _train_in_process(spec, ctx, run, log)
    _save_model(model, rdir / "model.pt")
    write_json(rdir / "train.json", info)
    return info


def _train_in_process(spec: StudySpec, ctx: Context, run: RunSpec, log: Log):
    """(trained model, train.json info) from the single-rank trainer on packed data."""
    from .engine import seed_all, train_run

    shard = str(ctx.shards_for(run, entry_of(spec, run)))
    seq = spec.train.seq_length
    docs = _docs(shard, "train")
    keep, labels = sdata.method_selection(docs, run.base_method, run.seed, run.forget_share)
    packed = sdata.pack(docs, seq, seed=run.seed, keep=keep, labels=labels)
    curve_sets = {}
    for name, split in (("retain", "test_retain"), ("forget", "test_forget")):
        rows = _eval_rows(shard, split, seq, spec.train.curve_eval_sequences)
        if rows is not None:
            curve_sets[name] = rows.tokens
    seed_all(run.seed)
    model = _load_model(spec, ctx, run, None)
    outcome = train_run(model, packed, spec.train, run.tokens, run.seed, curve_sets,
                        progress=lambda m: log(f"{run.run_id}: {m}"))
    return model, asdict(outcome) | {"train_sequences_available": len(packed)}


def _eval_sets(spec: StudySpec, shard: str) -> dict:
    seq, limit = spec.train.seq_length, spec.eval.max_sequences
    from .engine import batches_of

    out = {}
    for name in ("retain", "forget", "adjacent"):
        rows = _eval_rows(shard, f"test_{name}", seq, limit)
        if rows is not None and len(rows):
            out[name] = batches_of(rows, 32)
    return out


def _calibration_sets(spec: StudySpec, shard: str) -> dict:
    from .engine import batches_of

    seq, n = spec.train.seq_length, spec.eval.calibration_batch * 4
    out = {}
    for name, truth in (("retain", 0), ("forget", 1), ("adjacent", 2)):
        rows = _train_by_truth(shard, truth, seq, n)
        if rows is not None and len(rows):
            out[name] = batches_of(rows, spec.eval.calibration_batch)
    return out


def _generation_rate(spec: StudySpec, ctx: Context, model, bias, shard: str) -> dict:
    import torch

    from ..post.generation import SamplingConfig, capability_rate, generate

    ev = spec.eval
    from ..transfer import compute_device

    prompts = torch.from_numpy(sdata.prompts(Path(shard), ev.generation_prompts,
                                             ev.prompt_tokens)).to(compute_device())
    head = model.output_layer
    saved = None
    if bias is not None:
        # Generate from the calibrated model: the bias enters as a forward hook on the logits.
        saved = head.register_forward_hook(lambda m, i, o: (o[0] + bias, *o[1:]))
    try:
        rows = generate(model, prompts, SamplingConfig(max_new_tokens=ev.generation_tokens,
                                                       temperature=ev.temperature, seed=0),
                        eod_id=ctx.eod_id)
    finally:
        if saved is not None:
            saved.remove()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(shard) / "tokenizer.model"))
    texts = [sp.decode(r) for r in rows]
    out = capability_rate(texts, _classifier(shard))
    out["examples"] = texts[:3]
    return out


def _attack(spec: StudySpec, model, shard: str, evals: dict, log: Log) -> dict:
    from ..post.attack import AttackConfig, adversarial_finetune
    from .engine import batch_of

    a, seq = spec.attack, spec.train.seq_length
    half = max(1, a.batch_size // 2)
    forget = _train_by_truth(shard, 1, seq, 100_000)
    retain = _train_by_truth(shard, 0, seq, 100_000)

    def stream(packed):
        i = 0
        while True:
            idx = np.arange(i, i + half) % len(packed)
            i += half
            yield batch_of(packed.tokens[idx])

    cfg = AttackConfig(lr=a.lr, warmup_steps=a.warmup_steps, cosine_steps=a.steps,
                       max_steps=a.steps, eval_every=a.eval_every, stop_at_target=False)
    eval_forget = evals["forget"][:max(1, a.eval_sequences // 32)]
    res = adversarial_finetune(model, stream(forget), stream(retain), eval_forget, None, cfg)
    return {"curve": res.curve}


def eval_stage(spec: StudySpec, ctx: Context, run: RunSpec, trained: dict, log: Log) -> dict:
    import torch

    from ..post.ablate import zero_forget_
    from ..post.calibration import CalibrationConfig, calibrate_output_bias
    from ..post.evaluate import evaluate_split

    rdir = ctx.run_dir(run)
    shard = str(ctx.shards_for(run, entry_of(spec, run)))
    start = time.time()
    model = _load_model(spec, ctx, run, rdir / "model.pt")
    if run.base_method in ABLATED:
        zero_forget_(model)
    evals = _eval_sets(spec, shard)
    row: dict = {}
    for name, items in evals.items():
        row[f"{name}_loss_raw"] = evaluate_split(model, name, items).loss
    calib = _calibration_sets(spec, shard)
    ev = spec.eval
    bias = None
    if ev.calibration_steps > 0 and "forget" in calib and "retain" in calib:
        bias = calibrate_output_bias(
            model, calib["forget"], calib["retain"], calib.get("adjacent"),
            CalibrationConfig(steps=ev.calibration_steps, lr=ev.calibration_lr,
                              alpha=ev.calibration_alpha, beta=ev.calibration_beta))
    for name, items in evals.items():
        row[f"{name}_loss"] = (evaluate_split(model, name, items, bias).loss if bias is not None
                               else row[f"{name}_loss_raw"])
    if ev.generation_prompts > 0:
        gen = _generation_rate(spec, ctx, model, bias, shard)
        row["generation_rate"] = gen["rate"]
        write_json(rdir / "generation.json", gen)
    if ev.lm_eval_tasks:
        from ..post.lm_eval_run import score_model

        row.update(score_model(model, Path(shard) / "tokenizer.model", rdir, ev.lm_eval_tasks,
                               ctx.out / "data" / "lm_eval_tasks", ev.lm_eval_limit))
    attacked = run.method in spec.attack.methods or run.base_method in spec.attack.methods
    if spec.attack.enabled and run.kind == "main" and attacked:
        with torch.enable_grad():
            write_json(rdir / "attack.json", _attack(spec, model, shard, evals, log))
        row["attack"] = True
    row["eval_seconds"] = time.time() - start
    return row


def execute(spec: StudySpec, ctx: Context, run: RunSpec, log: Log = print) -> dict:
    """Run (or resume) one run; returns its result row. Failures raise after error.txt."""
    from .engine import worker_init

    rdir = ctx.run_dir(run)
    rdir.mkdir(parents=True, exist_ok=True)
    if (rdir / "result.json").exists():
        return json.loads((rdir / "result.json").read_text())
    try:
        worker_init(spec.train.threads)
        trained = train_stage(spec, ctx, run, log)
        evaluated = eval_stage(spec, ctx, run, trained, log)
        size = size_by_name(spec, run.size)
        from .engine import core_config

        model = core_config(size, ctx.vocab, spec.train.seq_length, entry_of(spec, run)).model
        params = param_count(size, ctx.vocab, spec.train.seq_length, model)
        row = run.to_dict() | {
            "status": "done", "params": params["total"], "non_embedding_params": params["non_embedding"],
            "active_non_embedding_params": params["active_non_embedding"],
            "tokens_trained": trained["tokens"], "steps": trained["steps"],
            "flops": train_flops(params["active_non_embedding"], trained["tokens"]),
            "forget_tokens_seen": trained["forget_tokens_seen"],
            "undiscovered_tokens_seen": trained["undiscovered_tokens_seen"],
            "train_seconds": trained["seconds"], **evaluated, "sgtm_version": version_string()}
        write_json(rdir / "result.json", row)
        (rdir / "error.txt").unlink(missing_ok=True)
        log(f"{run.run_id}: done (retain {row.get('retain_loss', float('nan')):.3f}, "
            f"forget {row.get('forget_loss', float('nan')):.3f})")
        return row
    except Exception:
        (rdir / "error.txt").write_text(traceback.format_exc())
        raise
