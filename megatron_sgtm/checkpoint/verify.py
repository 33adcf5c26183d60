"""The gate every load goes through: file checksums first, then the pickle allowlist.

Collective when torch.distributed is initialised (every rank of the job calls it, as it calls
``load_checkpoint``): the sha256 work is split over the ranks, and every rank raises the same
error. Nothing here writes to the checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import collective, integrity, rank_state, vetting
from .layout import (FORMAT_VERSION, META_FILE, PICKLED_RANK_FORMAT, CheckpointError,
                     read_metadata)


def legacy_message(directory: Path) -> str:
    return (f"{directory}: a format-{PICKLED_RANK_FORMAT} checkpoint: its per-rank files "
            "(rank_XXXXX.pt) are Python pickles, and unpickling a file can run arbitrary code. "
            f"This version writes pickle-free format {FORMAT_VERSION} and does not unpickle "
            f"format {PICKLED_RANK_FORMAT} unless told to. {vetting.TRUST_HINT}; saving it again "
            f"(sgtm ablate, or resuming training) writes format {FORMAT_VERSION}")


def record_files(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file under ``directory`` but the metadata (collective)."""
    present = collective.broadcast(
        integrity.list_files(directory, exclude={META_FILE}) if collective.rank() == 0 else None)
    bad = sorted(name for name, size in present.items() if size < 0)
    if bad:
        raise CheckpointError(f"{directory}: {bad[0]} is not a regular file; a checkpoint "
                              "holds only regular files")
    mine = integrity.shares(present, collective.world())[collective.rank()]
    merged: dict[str, dict] = {}
    for part in collective.gather_all(integrity.digests(directory, mine)):
        merged.update(part)
    return dict(sorted(merged.items()))


def _agreed(problems: list[str]) -> list[str]:
    return sorted({p for part in collective.gather_all(problems) for p in part})


def verify_checkpoint(directory, meta: Optional[dict] = None, trust_pickle: bool = False) -> dict:
    """Raise ``CheckpointError`` unless ``directory`` is safe to load; returns its metadata.

    - Format 1 (pickled per-rank files) is refused unless ``trust_pickle``.
    - Every file must match the sha256 and size recorded at save; none may be missing or
      added. Checked even with ``trust_pickle``: trust is about origin, not corruption.
    - Every per-rank file parses as ours (a safetensors header; never unpickled).
    - Unless ``trust_pickle``: the pickled files megatron's loader reads (``vetting.py``).
    """
    directory = Path(directory)
    meta = read_metadata(directory) if meta is None else meta
    if meta.get("format_version") == PICKLED_RANK_FORMAT:
        if not trust_pickle:
            raise CheckpointError(legacy_message(directory))
        return meta
    recorded = meta.get("files")
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        raise CheckpointError(f"{directory}: its metadata records no file checksums "
                              f"(damaged {META_FILE}?)")
    present = integrity.list_files(directory, exclude={META_FILE})
    problems = integrity.listing_problems(recorded, present)
    if not problems:
        mine = integrity.shares(present, collective.world())[collective.rank()]
        problems = integrity.digest_problems(directory, recorded, mine)
    problems = _agreed(problems)
    if problems:
        raise CheckpointError(integrity.summary(problems, directory))
    refused = []
    if collective.rank() == 0:  # the files are the same for every rank: check them once
        try:
            for path in sorted(directory.glob("rank_*.safetensors")):
                rank_state.read_extra(path)
            if not trust_pickle:
                vetting.vet_checkpoint(directory)
        except CheckpointError as exc:
            refused.append(str(exc))
    refused = _agreed(refused)
    if refused:
        raise CheckpointError(refused[0])
    return meta
