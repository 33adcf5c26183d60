"""Checkpoint directory layout, metadata and the atomic-publish rules.

A root holds complete checkpoints ``step_XXXXXXXX/`` and a ``latest`` pointer file. A save is
written into ``step_XXXXXXXX.tmp-<nonce>/`` and renamed only once every rank has finished, so
a directory is complete if and only if it has the final name *and* its ``sgtm_meta.json``.
Anything else (a ``.tmp-`` directory left by a crash, a directory without metadata) is never
loaded.

Inside a checkpoint:
- ``state/``: megatron ``dist_checkpointing`` (model + optimizer, resharded on load);
- ``sgtm_meta.json``: step, full config, partition global ids, model tensor shapes, versions,
  and the sha256 and size of every other file (``files``);
- ``rank_XXXXX.safetensors``: the per-rank part of ``extra`` (RNG states, data position,
  counters) as tensors + JSON, no pickle (``rank_state.py``).

Format 1 (before per-rank files left pickle) stored ``rank_XXXXX.pt`` pickles and no
checksums; it loads only when the caller trusts the checkpoint (``--trust-checkpoint``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

FORMAT_VERSION = 2
PICKLED_RANK_FORMAT = 1  # the last format whose per-rank files were pickles
META_FILE = "sgtm_meta.json"
STATE_DIR = "state"
LATEST_FILE = "latest"
_FINAL = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, found or loaded; the message says why."""


def step_dir_name(step: int) -> str:
    if step < 0 or step >= 10**8:
        raise CheckpointError(f"step {step} is outside 0..99999999")
    return f"step_{step:08d}"


def rank_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank_{rank:05d}.safetensors"


def pickled_rank_file(directory: Path, rank: int) -> Path:
    """Format 1's per-rank file (a pickle)."""
    return Path(directory) / f"rank_{rank:05d}.pt"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse directory fsync; the rename is still atomic
    finally:
        os.close(fd)


def is_complete(directory: Path) -> bool:
    directory = Path(directory)
    return bool(_FINAL.match(directory.name)) and (directory / META_FILE).is_file() and \
        (directory / STATE_DIR).is_dir()


def read_metadata(directory) -> dict:
    """The metadata of a complete checkpoint directory; ``CheckpointError`` otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not _FINAL.match(directory.name):
        raise CheckpointError(f"{directory}: not a complete checkpoint (name is not "
                              "step_XXXXXXXX; unfinished saves end in .tmp-*)")
    path = directory / META_FILE
    if not path.is_file() or not (directory / STATE_DIR).is_dir():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {META_FILE} or "
                              f"{STATE_DIR}/)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in (PICKLED_RANK_FORMAT, FORMAT_VERSION):
        raise CheckpointError(f"{path}: not format-{FORMAT_VERSION} checkpoint metadata "
                              f"(format_version {version!r})")
    meta.setdefault("partition_meta", meta.get("partition"))
    meta.setdefault("extra", _rank0_extra(directory) if version == FORMAT_VERSION else {})
    return meta


def _rank0_extra(directory: Path) -> dict:
    """Rank 0's ``extra`` (without RNG states): the run-wide record callers read. Format 1's
    pickled ``extra`` is read only by a trusted load (``load_checkpoint``), never here."""
    path = rank_file(directory, 0)
    if not path.is_file():
        return {}
    from .rank_state import read_extra

    try:
        return dict(read_extra(path))
    except CheckpointError:
        return {}  # a damaged file fails the load's checks, which name it



def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_FINAL.match(p.name).group(1)))


def latest_checkpoint(root) -> Optional[Path]:
    """The checkpoint ``root/latest`` names if it is complete, else the highest complete step."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        candidate = root / name
        if name and "/" not in name and is_complete(candidate):
            return candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve(root_or_dir) -> Path:
    """A complete checkpoint directory given itself or a root holding checkpoints."""
    path = Path(root_or_dir)
    if is_complete(path):
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: does not exist")
    if _FINAL.match(path.name):
        read_metadata(path)  # raises with the precise reason
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: holds no complete checkpoint")
    return found


def publish(tmp: Path, root: Path, step: int) -> Path:
    """Rename a finished temporary directory to its final name and point ``latest`` at it."""
    final = root / step_dir_name(step)
    old = None
    if final.exists():  # a re-save of the same step (e.g. after resuming): swap, then drop
        old = final.with_name(f"{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(root: Path, keep_last: Optional[int], current: Path) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep_last`` and leftovers of
    interrupted saves (``.tmp-``) or interrupted same-step replacements (``.old-``). Runs only after ``current`` is complete."""
    removed = []
    leftovers = list(root.glob("step_*.tmp-*")) + list(root.glob("step_*.old-*"))
    for leftover in leftovers:
        if leftover != current:
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    if keep_last is None or keep_last <= 0:
        return removed
    complete = [p for p in complete_checkpoints(root) if p != current]
    keep = set(complete[-(keep_last - 1):]) if keep_last > 1 else set()
    for path in complete:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
