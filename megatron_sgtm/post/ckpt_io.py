"""Checkpoints in and out for the post-training commands (megatron_sgtm.checkpoint format).

The checkpoint's metadata holds the full config and the partition's global forget ids; the
model is rebuilt from that config at the TP size of this process (dist_checkpointing
reshards), and the stored partition must equal the one the config implies. Every load goes
through the checkpoint's sha256 and pickle checks (``checkpoint/verify.py``); a Hugging Face
safetensors export is loaded instead by ``hf_import.py``, with no pickle at all.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from ..config import CoreConfig
from ..configbase import ConfigError, config_from_dict
from ..partition import PartitionError, build_partition


class PostError(Exception):
    """One clear message for the user; the CLI prints it and exits 2."""


def _ckpt():
    try:
        from .. import checkpoint
    except ImportError as exc:  # the package is optional at import time of this module
        raise PostError(f"checkpoints need megatron_sgtm.checkpoint ({exc})") from None
    return checkpoint


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a root whose latest checkpoint is taken."""
    ck = _ckpt()
    path = Path(path)
    if not path.exists():
        raise PostError(f"checkpoint {path}: does not exist")
    try:
        ck.read_metadata(path)
        return path
    except ck.CheckpointError:
        pass
    latest = ck.latest_checkpoint(path)
    if latest is None:
        raise PostError(f"checkpoint {path}: neither a checkpoint nor a root holding one")
    return Path(latest)


def metadata(path: Path) -> dict:
    ck = _ckpt()
    try:
        return ck.read_metadata(path)
    except ck.CheckpointError as exc:
        raise PostError(f"checkpoint {path}: {exc}") from None


def _core_dict(config: dict) -> dict:
    """The CoreConfig part of a stored config (an ExperimentConfig nests it under 'core' or
    keeps model/partition/routing at top level)."""
    if "core" in config and isinstance(config["core"], dict):
        return config["core"]
    keys = ("model", "partition", "routing", "tensor_parallel")
    return {k: config[k] for k in keys if k in config}


def post_hoc_model(model: dict) -> None:
    """A stored model config as post-hoc work builds it, in place. That work (evaluation,
    calibration, attack fine-tuning, RMU) runs in fp32 on every device: it updates weights
    with a plain AdamW that keeps no fp32 master copy, and reports losses; a bf16-trained
    checkpoint loads into fp32 exactly. It runs at expert parallelism 1, where an MoE's token
    dispatcher is allgather (the dispatcher changes no result)."""
    model["params_dtype"] = "fp32"
    if isinstance(model.get("moe"), dict):
        model["moe"]["dispatcher"] = "allgather"


def core_config(meta: dict, path: Path, tensor_parallel: int) -> CoreConfig:
    config = meta.get("config")
    if not isinstance(config, dict):
        raise PostError(f"checkpoint {path}: metadata holds no config")
    raw = copy.deepcopy(_core_dict(config))
    raw["tensor_parallel"] = tensor_parallel
    if isinstance(raw.get("model"), dict):
        post_hoc_model(raw["model"])
    try:
        core = config_from_dict(CoreConfig, raw)
    except ConfigError as exc:
        raise PostError(f"checkpoint {path}: stored config is not usable at "
                        f"tensor_parallel={tensor_parallel}: {exc}") from None
    return core


def partition_metadata(meta: dict) -> Optional[dict]:
    for key in ("partition_meta", "partition", "partition_metadata"):
        value = meta.get(key)
        if isinstance(value, dict) and "forget_mlp" in value:
            return value
    return None


def check_partition(meta: dict, core: CoreConfig, path: Path) -> dict:
    stored = partition_metadata(meta)
    if stored is None:
        raise PostError(f"checkpoint {path}: no partition metadata (global forget ids); "
                        "cannot tell which parameters are theta_forget")
    try:
        expected = build_partition(core.model, core.partition, core.routing).to_metadata()
    except PartitionError as exc:
        raise PostError(f"checkpoint {path}: {exc}") from None
    if any(stored.get(k) != v for k, v in expected.items()):
        raise PostError(f"checkpoint {path}: stored partition {stored} does not match the one "
                        f"its config implies {expected}")
    return stored


def _find_sha(node: Any) -> Optional[str]:
    """The tokenizer sha256 recorded anywhere in a config/metadata tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "tokenizer_sha256" and isinstance(value, str):
                return value
            if key == "tokenizer" and isinstance(value, dict) and isinstance(value.get("sha256"), str):
                return value["sha256"]
        for value in node.values():
            found = _find_sha(value)
            if found:
                return found
    return None


def check_tokenizer(meta: dict, manifest: dict, path: Path, data: Path) -> None:
    """The eval data must be tokenized with the tokenizer the model was trained with."""
    ours = _find_sha(meta)
    theirs = (manifest.get("tokenizer") or {}).get("sha256")
    if ours and theirs and ours != theirs:
        raise PostError(f"tokenizer mismatch: checkpoint {path} was trained with tokenizer "
                        f"sha256 {ours[:12]}…, data {data} uses {theirs[:12]}…")


def load(path: Path, tensor_parallel: int, trust_pickle: bool = False):
    """(model, core, metadata) for this process's TP rank. parallel_state must be set up.

    ``path``: a checkpoint (or a root), or a Hugging Face safetensors export directory.
    ``trust_pickle`` (``--trust-checkpoint``) admits pickled content outside the allowlist."""
    from ..model import build_model
    from . import hf_import

    if hf_import.is_hf_export(path):
        return hf_import.load(path, tensor_parallel)
    path = resolve(path)
    meta = metadata(path)
    core = core_config(meta, path, tensor_parallel)
    partition = check_partition(meta, core, path)
    model = build_model(core)
    ck = _ckpt()
    try:
        extra = ck.load_checkpoint(path, model, None, meta["config"], partition,
                                   trust_pickle=trust_pickle)
    except ck.CheckpointError as exc:
        message = str(exc)  # the checks' messages start with the directory already
        raise PostError(message if message.startswith(str(path)) else
                        f"checkpoint {path}: {message}") from None
    # The training loop records the data manifest summary (tokenizer sha256) in ``extra``.
    meta["extra"] = {k: v for k, v in extra.items() if k not in ("rng_state", "checkpoint")}
    return model, core, meta


def save(out: Path, model, core: CoreConfig, meta: dict, extra: dict) -> Path:
    """Write ``model`` as a checkpoint under ``out`` with ``core`` replacing the stored core."""
    ck = _ckpt()
    config = copy.deepcopy(meta["config"])
    from ..configbase import config_to_dict

    core_dict = config_to_dict(core)
    if "core" in config and isinstance(config["core"], dict):
        config["core"] = core_dict
    else:
        config.update(core_dict)
    partition = build_partition(core.model, core.partition, core.routing).to_metadata()
    step = int(meta.get("step", 0))
    ck.save_checkpoint(Path(out), step, model, None, dict(meta.get("extra") or {}, **extra),
                       config, partition, keep_last=None)
    return Path(out)
