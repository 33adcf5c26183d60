"""save_checkpoint / load_checkpoint: model + optimizer via megatron dist_checkpointing.

Collective: every rank of the job calls them (dist_checkpointing saves each rank's shards).
Scripts that save on CPU must run under ``if __name__ == "__main__":``: torch's distributed
checkpoint writer may start worker processes, which re-import the main module.
"""
from __future__ import annotations

import json
import platform
import secrets
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import optim, rank_state
from .collective import barrier as _barrier
from .collective import broadcast as _broadcast
from .collective import gather_all
from .collective import rank as _rank
from .collective import world as _world
from .layout import (FORMAT_VERSION, META_FILE, PICKLED_RANK_FORMAT, STATE_DIR, CheckpointError,
                     atomic_write_text, pickled_rank_file, prune, publish, rank_file,
                     read_metadata, resolve, step_dir_name)
from .verify import record_files, verify_checkpoint


def _parallel_sizes() -> dict:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": _world()}
    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mcore = version("megatron-core")
    except PackageNotFoundError:
        mcore = "unknown"
    from ..version import version_string

    return {"torch": torch.__version__, "megatron_core": mcore, "python": platform.python_version(),
            "megatron_sgtm": version_string()}


def model_shapes(model_sd) -> dict[str, list[int]]:
    """Global shape of every sharded model tensor, by checkpoint key, over all ranks of the
    job (pipeline stages hold different tensors; TP and PP sizes do not change the result)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    mine = {t.key: list(t.global_shape) for t in nested_values(model_sd)
            if isinstance(t, ShardedTensor)}
    merged: dict[str, list[int]] = {}
    for shapes in (gather_all(mine) if _world() > 1 else [mine]):
        merged.update(shapes)
    return dict(sorted(merged.items()))


def rng_state() -> dict:
    """This process's random states (python, numpy, torch CPU/CUDA, megatron's TP tracker)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dicts(model, optimizer, loading: bool, common: Optional[dict] = None):
    """(sharded state dict for dist_checkpointing, optimizer common part or None)."""
    model_sd = model.sharded_state_dict()
    kind = optim.kind(optimizer)
    state: dict[str, Any] = {"model": model_sd}
    opt_common = None
    if kind == "torch":
        if loading:
            state["optimizer"] = optim.torch_template_for_load(optimizer, model_sd, common)
        else:
            parts = optim.torch_state_for_save(optimizer, model_sd)
            state["optimizer"], opt_common = parts["sharded"], parts["common"]
            state["optimizer_common"] = opt_common
    elif kind == "sharded":
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading)
    return state, kind, opt_common


def save_checkpoint(root, step: int, model, optimizer, extra: dict, config: dict,
                    partition_meta: dict, keep_last: Optional[int] = None,
                    hooks: Sequence[Any] = ()) -> Path:
    """Write checkpoint ``root/step_{step:08d}`` atomically; returns its path (all ranks).

    ``extra``: this rank's small state (scheduler, data position, counters); stored per rank
    together with this rank's RNG states. ``hooks``: objects with ``save(tmp_dir)`` called on
    every rank inside the unfinished directory (e.g. a DeepSpeed engine's own save), so their
    files are published atomically with the rest.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = _rank()
    name = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        name = f"{step_dir_name(step)}.tmp-{secrets.token_hex(6)}"
        (root / name / STATE_DIR).mkdir(parents=True)
    tmp = root / _broadcast(name)
    _barrier()  # the directory exists before anyone writes into it

    state, kind, _ = _state_dicts(model, optimizer, loading=False)
    shapes = model_shapes(state["model"])
    dist_checkpointing.save(state, str(tmp / STATE_DIR))
    rank_state.write(rank_file(tmp, rank), extra, rng_state())
    for hook in hooks:
        hook.save(tmp)
    _barrier()  # every rank's files are on disk
    files = record_files(tmp)  # sha256 of each, the work split over the ranks

    final = root / step_dir_name(step)
    if rank == 0:
        sizes, versions = _parallel_sizes(), _versions()
        meta = {"format_version": FORMAT_VERSION, "step": int(step), "config": config,
                "files": files,
                "partition": partition_meta, "model_shapes": shapes, "optimizer": kind,
                "world_size": _world(), **sizes, "tp": sizes["tensor_parallel"],
                "dp": sizes["data_parallel"], "versions": versions,
                "sgtm_version": versions["megatron_sgtm"],
                "torch_version": versions["torch"],
                "megatron_core_version": versions["megatron_core"]}
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True,
                                                      default=str) + "\n")
        publish(tmp, root, step)
        prune(root, keep_last, final)
    _barrier()  # nobody returns (or starts the next save) before the rename
    return final


def _diff(expected: dict, stored: dict, what: str) -> list[str]:
    out = []
    for key in sorted(set(expected) | set(stored)):
        if key not in stored:
            out.append(f"{what} {key!r}: missing from the checkpoint")
        elif key not in expected:
            out.append(f"{what} {key!r}: in the checkpoint only")
        elif expected[key] != stored[key]:
            out.append(f"{what} {key!r}: checkpoint {stored[key]} vs expected {expected[key]}")
    return out


# Model-config keys that change what the weights mean even where tensor shapes agree
# (activation, positions, tying); other keys (dropout, init, recompute) may change on resume.
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "vocab_size", "activation", "position_embedding",
              "tie_embeddings", "output_bias", "kv_channels", "normalization",
              "add_bias_linear")


def _model_section(config) -> Optional[dict]:
    """The model config inside a stored config: top-level ``model`` or ``core.model``."""
    if not isinstance(config, dict):
        return None
    for node in (config, config.get("core")):
        if isinstance(node, dict) and isinstance(node.get("model"), dict):
            return node["model"]
    return None


def _model_keys(model: dict) -> dict:
    out = {k: model[k] for k in MODEL_KEYS if k in model}
    # Unset defaults resolve to the same model as their explicit values.
    heads, hidden = out.get("num_attention_heads"), out.get("hidden_size")
    if out.get("num_query_groups") is None and heads is not None:
        out["num_query_groups"] = heads
    if out.get("kv_channels") is None and heads and hidden:
        out["kv_channels"] = hidden // heads
    return out


def config_problems(stored_config, expected_config) -> list[str]:
    stored, expected = _model_section(stored_config), _model_section(expected_config)
    if stored is None or expected is None:
        return []  # nothing to compare; tensor shapes and the partition still decide
    return _diff(_model_keys(expected), _model_keys(stored), "model")


def check_compatible(meta: dict, shapes: dict, expected_partition: Optional[dict],
                     expected_config: Optional[dict] = None) -> None:
    """Raise one CheckpointError listing every difference that makes a load wrong.

    The partition's global forget ids, the model-shape keys of the config and every tensor's
    global shape are compared; other config differences (learning rate, steps, dropout) are
    legitimate on resume, and TP size may differ because dist_checkpointing reshards.
    """
    problems = []
    if expected_partition is not None:
        problems += _diff(expected_partition, meta.get("partition") or {}, "partition")
    problems += config_problems(meta.get("config"), expected_config)
    problems += _diff(shapes, meta.get("model_shapes") or {}, "tensor")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20
                                 else [])
        raise CheckpointError("checkpoint does not match this model:\n  " + "\n  ".join(shown))


def load_checkpoint(root_or_dir, model, optimizer, expected_config: Optional[dict],
                    expected_partition: Optional[dict], hooks: Sequence[Any] = (),
                    trust_pickle: bool = False) -> dict:
    """Load the latest complete checkpoint (or the given one) into ``model``/``optimizer``.

    Everything that would make the load wrong (another partition, other tensor shapes, a
    missing optimizer state) is checked before the model is touched: the partition ids, the
    model-shape keys of ``expected_config`` (``model`` at top level or under ``core``) and
    every tensor's global shape. Then ``verify_checkpoint``: every file's sha256, and the
    pickle allowlist for the files megatron unpickles (``trust_pickle`` skips the allowlist
    and admits format-1 checkpoints, whose per-rank files are pickles). Returns this rank's
    ``extra`` with ``step``-independent keys added: ``rng_state`` (this rank's RNG states; pass
    to ``restore_rng_state``) and ``checkpoint`` (the directory loaded).
    """
    from megatron.core import dist_checkpointing

    directory = resolve(root_or_dir)
    meta = read_metadata(directory)
    check_compatible(meta, model_shapes(model.sharded_state_dict()), expected_partition,
                     expected_config)
    verify_checkpoint(directory, meta, trust_pickle)
    kind = optim.kind(optimizer)
    if kind != "none" and meta.get("optimizer") != kind:
        raise CheckpointError(f"{directory}: holds optimizer state of kind "
                              f"{meta.get('optimizer')!r}, this run needs {kind!r}")
    state_dir = str(directory / STATE_DIR)
    common = None
    if kind == "torch":
        common = dist_checkpointing.load_common_state_dict(state_dir).get("optimizer_common")
        if common is None:
            raise CheckpointError(f"{directory}: optimizer state is missing")
    state, kind, _ = _state_dicts(model, optimizer, loading=True, common=common)
    loaded = dist_checkpointing.load(state, state_dir)
    model.load_state_dict(loaded["model"], strict=True)
    if kind == "torch":
        optim.torch_load(optimizer, loaded["optimizer"], common)
    elif kind == "sharded":
        optimizer.load_state_dict(loaded["optimizer"])
    for hook in hooks:  # the counterpart of save_checkpoint's hooks (e.g. DeepSpeed's files)
        hook.load(directory)

    extra = _rank_extra(directory, meta.get("format_version"))
    extra.setdefault("checkpoint", str(directory))
    return extra


def _rank_extra(directory: Path, version) -> dict:
    """This rank's ``extra`` plus ``rng_state``; rank 0's when the run had fewer ranks."""
    pickled = version == PICKLED_RANK_FORMAT  # only reached when the caller trusts it
    name = pickled_rank_file if pickled else rank_file
    mine = name(directory, _rank())
    if not mine.exists():  # resumed on more ranks than saved: rank 0's position is global
        mine = name(directory, 0)
    if not mine.exists():
        return {}
    if pickled:
        saved = torch.load(mine, weights_only=False)
    else:
        saved = rank_state.read(mine)
    extra = dict(saved.get("extra") or {})
    extra.setdefault("rng_state", saved.get("rng"))
    return extra


__all__ = ["save_checkpoint", "load_checkpoint", "check_compatible", "model_shapes",
           "rng_state", "restore_rng_state", "verify_checkpoint", "CheckpointError"]
