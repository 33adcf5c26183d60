"""The training loop's only contact with the shard reader and the checkpoint package.

Errors from either come back as ``TrainError`` with the package's own message.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional


from ..configbase import config_to_dict
from .config import ExperimentConfig
from .errors import TrainError


def _data():
    from .. import data

    return data


def _ckpt():
    from .. import checkpoint

    return checkpoint


# ---------------------------------------------------------------- data


def _open(cfg: ExperimentConfig, split: str):
    data = _data()
    try:
        return data.open_split(cfg.data.dir, split)
    except data.DataError as exc:
        raise TrainError(f"data: {exc}") from None


def check_data(cfg: ExperimentConfig):
    """Open (and so validate) the train split; check the vocabulary fits. Returns the split
    (``train_batches`` takes it: a rank opens its data once)."""
    split = _open(cfg, cfg.data.split)
    manifest = dict(getattr(split, "manifest", {}) or {})
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise TrainError(f"data: tokenizer has {vocab} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}")
    return split


def control_ids(manifest: dict, cfg: ExperimentConfig) -> Optional[tuple[int, int]]:
    if cfg.data.method != "conditional":
        return None
    tok = manifest.get("tokenizer") or {}
    if tok.get("good_id") is None or tok.get("bad_id") is None:
        raise TrainError("data: conditional training needs tokenizer.good_id/bad_id in the "
                         "manifest (control tokens); re-run `sgtm prep`")
    return int(tok["good_id"]), int(tok["bad_id"])


def manifest_summary(manifest: dict) -> dict:
    tok = manifest.get("tokenizer") or {}
    return {"tokenizer_sha256": tok.get("sha256"), "vocab_size": tok.get("vocab_size")}


def train_batches(cfg: ExperimentConfig, dp_rank: int, dp_size: int, split=None):
    data = _data()
    try:
        return data.TrainBatches(split or _open(cfg, cfg.data.split), seq_length=cfg.model.seq_length,
                                 micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank,
                                 dp_size=dp_size, seed=cfg.train.seed, method=cfg.data.method)
    except data.DataError as exc:
        raise TrainError(f"data: {exc}") from None


def eval_batches(cfg: ExperimentConfig, split: str, dp_rank: int, dp_size: int):
    """This DP rank's share of a fixed set of ``data.eval_batches`` x micro-batch held-out
    sequences (the same set at every DP size), or None when the optional split is absent."""
    data = _data()
    if not (Path(cfg.data.dir) / f"{split}_tokens.idx").exists():
        return None
    mbs = cfg.train.micro_batch_size
    try:
        split_data = _open(cfg, split)
        if hasattr(data, "EvalBatches"):
            return data.EvalBatches(split_data, seq_length=cfg.model.seq_length,
                                    micro_batch_size=mbs,
                                    max_samples=cfg.data.eval_batches * mbs,
                                    dp_rank=dp_rank, dp_size=dp_size)
        # A fixed seed gives the same held-out sequences at every evaluation.
        batches = data.TrainBatches(split_data, seq_length=cfg.model.seq_length,
                                    micro_batch_size=mbs, dp_rank=dp_rank, dp_size=dp_size,
                                    seed=0, method="none")
        return itertools.islice(iter(batches), -(-cfg.data.eval_batches // dp_size))
    except data.DataError as exc:
        raise TrainError(f"data: {exc}") from None


# ---------------------------------------------------------------- checkpoints


def partition_meta(engine) -> dict:
    return engine.model.partition.to_metadata()


def save(cfg: ExperimentConfig, step: int, engine, extra: dict) -> None:
    """Checkpoint model, optimizer and this rank's ``extra`` (the checkpoint package adds
    this rank's RNG states)."""
    ck = _ckpt()
    try:
        ck.save_checkpoint(Path(cfg.checkpoint.dir), step, engine.model,
                           engine.checkpoint_optimizer(), extra, config_to_dict(cfg),
                           partition_meta(engine), keep_last=cfg.checkpoint.keep_last,
                           hooks=engine.checkpoint_hooks())
    except ck.CheckpointError as exc:
        raise TrainError(f"checkpoint: {exc}") from None


def resume(cfg: ExperimentConfig, engine) -> Optional[dict]:
    """Load the latest checkpoint (``resume: auto|require``) and this rank's RNG states;
    returns its extra dict, or None when starting fresh."""
    if not cfg.checkpoint.dir or cfg.checkpoint.resume == "never":
        return None
    ck = _ckpt()
    root = Path(cfg.checkpoint.dir)
    latest = ck.latest_checkpoint(root) if root.exists() else None
    if latest is None:
        if cfg.checkpoint.resume == "require":
            raise TrainError(f"checkpoint: resume 'require' but {root} holds no checkpoint")
        return None
    try:
        extra = ck.load_checkpoint(latest, engine.model, engine.checkpoint_optimizer(),
                                   config_to_dict(cfg), partition_meta(engine),
                                   trust_pickle=cfg.checkpoint.trust_pickle)
        engine.after_load(Path(extra.get("checkpoint", latest)))
    except ck.CheckpointError as exc:
        raise TrainError(f"checkpoint: {exc}") from None
    if extra.get("rng_state"):
        ck.restore_rng_state(extra["rng_state"])
    return extra


__all__ = ["check_data", "train_batches", "eval_batches", "save", "resume", "control_ids"]
