"""Refuse pickled content that could run code, before a third-party loader unpickles it.

Our own per-rank files hold no pickle (``rank_state.py``). The formats we do not own do:

- ``state/.metadata``: torch.distributed.checkpoint's ``FileSystemReader.read_metadata``
  calls plain ``pickle.load`` on it;
- byte items inside ``state/__*_*.distcp`` (megatron ``ShardedObject``s such as every
  linear's ``_extra_state``): torch's ``DefaultLoadPlanner.load_bytes`` calls
  ``torch.load(weights_only=False)`` on them;
- ``state/common.pt``: megatron's ``TorchCommonLoadStrategy`` calls ``torch.load`` without
  ``weights_only`` (restricted only on torch >= 2.6 and unless
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set);
- ``deepspeed/**/*.pt``: DeepSpeed's ``TorchCheckpointEngine.load`` calls
  ``torch.load(weights_only=False)``.

Each of these is first unpickled here by a *restricted* unpickler that resolves only an
explicit allowlist of globals (torch's ``weights_only`` unpickler for torch files; our own for
the raw ``.metadata`` pickle). A payload has to name a callable such as ``os.system`` to run;
the restricted pass refuses it by name and nothing is executed. What passes references only
allowlisted classes, so the real loader that reads the same bytes afterwards runs no code
either. ``--trust-checkpoint`` skips these checks (never the sha256 checks).
"""
from __future__ import annotations

import functools
import importlib
import io
import json
import pickle
import re
from pathlib import Path
from typing import Iterable

from .layout import STATE_DIR, CheckpointError

TRUST_HINT = ("If you made this checkpoint yourself or trust its origin, rerun with "
              "--trust-checkpoint (checkpoint.trust_pickle=true for training)")


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file holds pickled references outside the allowlist."""


@functools.lru_cache(maxsize=1)
def _torch_values() -> frozenset[str]:
    """``torch.Size`` and every dtype name (``torch.float32`` pickles as a global)."""
    import torch

    return frozenset({"Size"} | {name for name, value in vars(torch).items()
                                 if isinstance(value, torch.dtype)})


# Everything torch.distributed.checkpoint (torch 2.13) pickles into ``.metadata``, as written
# by megatron-core 0.16.1's torch_dist strategy: dataclasses, enums, torch.Size, dtypes.
_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS: dict[str, frozenset[str]] = {
    f"{_DCP}.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    f"{_DCP}.filesystem": frozenset({"_StorageInfo"}),
    f"{_DCP}.planner": frozenset({
        "SavePlan", "LoadPlan", "WriteItem", "ReadItem", "TensorWriteData", "BytesIOWriteData",
        "WriteItemType", "LoadItemType"}),
    "torch.serialization": frozenset({"_get_layout"}),  # looks a layout up by its name
    "collections": frozenset({"OrderedDict"}),
}

# The DeepSpeed 0.19.8 classes its ZeRO-1/2 optimizer files hold besides tensors and
# containers; all are plain data (a loss-scale record, a stage enum, a named tuple).
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict[str, frozenset[str]]):
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module, name):
        if name in self._allowed.get(module, ()) or (module == "torch" and name in _torch_values()):
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpoint(f"{module}.{name}")

    def persistent_load(self, pid):
        raise UnsafeCheckpoint(f"persistent id {str(pid)[:40]!r}")


def _refuse(path: Path, what: str, name: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{path}: {what} holds a pickled reference to {name}, which is not "
                            "on this project's allowlist; loading it could run arbitrary code, "
                            f"so nothing was loaded. {TRUST_HINT}")


def _refused_by_torch(path: Path, what: str, exc: Exception) -> UnsafeCheckpoint:
    """Our message for torch's weights_only refusal: the global it names, else its reason."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return _refuse(path, what, found.group(1))
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    reason = (detail[0] if detail else type(exc).__name__)[:200]
    return UnsafeCheckpoint(f"{path}: {what} cannot be read by the restricted unpickler "
                            f"({reason}): it is damaged or holds pickled content outside this "
                            f"project's allowlist, so nothing was loaded. {TRUST_HINT}")


def read_dcp_metadata(path: Path):
    """The torch.distributed.checkpoint ``Metadata`` object, unpickled with the allowlist."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, METADATA_GLOBALS).load()
    except UnsafeCheckpoint as exc:
        raise _refuse(path, "this torch.distributed.checkpoint metadata", str(exc)) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None


def vet_torch_bytes(data, path: Path, what: str, extra_globals: Iterable = ()) -> None:
    """Unpickle ``torch.save`` output (a path or bytes) with torch's weights_only unpickler."""
    import torch

    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data)
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            torch.load(source, map_location="cpu", weights_only=True,
                       mmap=not isinstance(source, io.BytesIO))
    except pickle.UnpicklingError as exc:
        raise _refused_by_torch(path, what, exc) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None


def _plain_name(name: str, state: Path, path: Path) -> Path:
    target = state / name
    if "/" in name or "\\" in name or name in ("", ".", "..") or not target.is_file():
        raise UnsafeCheckpoint(f"{path}: names storage file {name!r}, which is not a file of "
                               "this checkpoint's state directory; nothing was loaded")
    return target


def vet_dcp(state: Path) -> None:
    """``state/``: backend, ``.metadata``, every byte item, and ``common.pt``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    config_path = state / "metadata.json"
    try:
        backend = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: unreadable ({exc})") from None
    if backend.get("sharded_backend") != "torch_dist" or backend.get("common_backend") != "torch":
        raise UnsafeCheckpoint(f"{config_path}: backend {backend} is not the torch_dist format "
                               f"this project writes; nothing was loaded. {TRUST_HINT}")
    metadata_path = state / ".metadata"
    metadata = read_dcp_metadata(metadata_path)
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        target = _plain_name(getattr(info, "relative_path", ""), state, metadata_path)
        entry = metadata.state_dict_metadata.get(getattr(index, "fqn", None))
        if isinstance(entry, BytesStorageMetadata):
            with open(target, "rb") as f:
                f.seek(int(info.offset))
                blob = f.read(int(info.length))
            vet_torch_bytes(blob, target, f"the byte item {index.fqn!r}")
    vet_torch_bytes(state / "common.pt", state / "common.pt", "megatron's common state")


def deepspeed_classes() -> list:
    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_GLOBALS]


def vet_deepspeed(directory: Path) -> None:
    """Every ``*.pt`` DeepSpeed wrote under ``directory`` (its engine's own save)."""
    allowed = deepspeed_classes()
    for path in sorted(Path(directory).rglob("*.pt")):
        vet_torch_bytes(path, path, "this DeepSpeed checkpoint file", allowed)


def vet_checkpoint(directory: Path) -> None:
    """The pickled files of a checkpoint that megatron's loader reads."""
    vet_dcp(Path(directory) / STATE_DIR)
