"""The per-rank file ``rank_XXXXX.safetensors``: RNG states and ``extra`` without pickle.

A safetensors file is a JSON header plus raw tensor bytes, so reading one can never run code.
Tensors (torch's, CUDA's and megatron's tracker RNG states, numpy's Mersenne-Twister keys,
any tensor or array in ``extra``) are stored as tensors; everything else goes to JSON in the
header under ``sgtm_rank_state``. Python's ``random`` state is a version, 625 ints and an
optional float: JSON holds it exactly (floats round-trip through ``repr``).

``extra`` may hold dicts with str keys, lists, tuples, str, int, float, bool, None, tensors and
numpy arrays/scalars; anything else is refused at save, so nothing is silently lost.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .layout import CheckpointError

HEADER_KEY = "sgtm_rank_state"
LAYOUT_VERSION = 1
_TENSOR, _ARRAY, _TUPLE = "__tensor__", "__ndarray__", "__tuple__"


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, value: torch.Tensor) -> str:
        if not isinstance(value, torch.Tensor):  # e.g. megatron's cudagraph-safe RNG Generators
            raise CheckpointError(f"{name}: a {type(value).__name__} cannot be stored (RNG "
                                  "states must be tensors)")
        # safetensors stores each tensor once, dense and on the CPU.
        self.tensors[name] = value.detach().to("cpu").contiguous().clone()
        return name

    def tree(self, value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {_TENSOR: self.tensor(f"extra/{len(self.tensors)}", value)}
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise CheckpointError(f"extra{where}: numpy object arrays cannot be stored")
            return {_ARRAY: self.tensor(f"extra/{len(self.tensors)}", torch.from_numpy(value))}
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            items = [self.tree(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return {_TUPLE: items} if isinstance(value, tuple) else items
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if not isinstance(key, str) or key in (_TENSOR, _ARRAY, _TUPLE):
                    raise CheckpointError(f"extra{where}: key {key!r} cannot be stored "
                                          "(keys must be str and not a reserved marker)")
                out[key] = self.tree(item, f"{where}[{key!r}]")
            return out
        raise CheckpointError(f"extra{where}: a {type(value).__name__} cannot be stored in a "
                              "checkpoint (use JSON values, tensors or numpy arrays)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_ARRAY}:
            return tensors[value[_ARRAY]].numpy()
        if set(value) == {_TUPLE}:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _encode_rng(rng: dict, enc: _Encoder) -> dict:
    version, internal, gauss = rng["python"]
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    out = {"python": [version, list(internal), gauss],
           "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                     "cached_gaussian": float(cached),
                     # uint32 keys, bit for bit, in a dtype every safetensors reader knows
                     "keys": enc.tensor("rng/numpy_keys", torch.from_numpy(
                         np.asarray(keys, np.uint32).view(np.int32)))},
           "torch": enc.tensor("rng/torch", rng["torch"]),
           "tracker": {name: enc.tensor(f"rng/tracker/{name}", state)
                       for name, state in rng["tracker"].items()}}
    if "cuda" in rng:
        out["cuda"] = enc.tensor("rng/cuda", rng["cuda"])
    return out


def _decode_rng(rng: dict, tensors: dict[str, torch.Tensor]) -> dict:
    version, internal, gauss = rng["python"]
    np_state = rng["numpy"]
    out = {"python": (version, tuple(internal), gauss),
           "numpy": (np_state["kind"], tensors[np_state["keys"]].numpy().view(np.uint32),
                     np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]),
           "torch": tensors[rng["torch"]],
           "tracker": {name: tensors[key] for name, key in rng["tracker"].items()}}
    if "cuda" in rng:
        out["cuda"] = tensors[rng["cuda"]]
    return out


def write(path: Path, extra: dict, rng: dict) -> None:
    from safetensors.torch import save_file

    enc = _Encoder()
    header = {"layout": LAYOUT_VERSION, "extra": enc.tree(dict(extra), ""),
              "rng": _encode_rng(rng, enc)}
    save_file(enc.tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})


def _header(path: Path) -> tuple[dict, Any]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        header = json.loads((handle.metadata() or {})[HEADER_KEY])
    except Exception as exc:  # any parse failure means: not a file this project wrote
        raise CheckpointError(f"{path}: not a per-rank state file of this project "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(header, dict) or header.get("layout") != LAYOUT_VERSION:
        raise CheckpointError(f"{path}: unknown per-rank state layout {header.get('layout')!r}")
    return header, handle


def read(path: Path) -> dict:
    """``{"extra": ..., "rng": ...}`` as given to ``write``; never unpickles anything."""
    header, handle = _header(path)
    try:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return {"extra": _decode(header["extra"], tensors),
                "rng": _decode_rng(header["rng"], tensors)}
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, exc) from None


def read_extra(path: Path) -> dict:
    """Only ``extra`` (what callers of ``read_metadata`` see), from the header alone."""
    header, handle = _header(path)
    try:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()
                   if name.startswith("extra/")}
        return _decode(header["extra"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, exc) from None


def _damaged(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: damaged per-rank state ({type(exc).__name__}: {exc})")
