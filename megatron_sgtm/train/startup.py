"""What a start cost, per rank: seconds from the rank's process start to its first step, and
bytes it read from storage until then (``megatron_sgtm.process_io``).

Taken once per start, just before the first step (after the data is opened, the model built
and any checkpoint loaded), with one all-gather of two numbers per rank. Rank 0 appends the
record to ``startup.jsonl`` in the run directory and prints one line, so a restart at scale
shows where its time and reads went without any extra tooling.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..process_io import read_bytes, seconds_since_start

UNKNOWN = -1.0  # a rank that cannot measure (no /proc)


def gather_startup(device: torch.device) -> dict:
    """Every rank's (seconds, read bytes) at this point (a collective: every rank calls it)."""
    seconds, nbytes = seconds_since_start(), read_bytes()
    mine = torch.tensor([UNKNOWN if seconds is None else seconds,
                         UNKNOWN if nbytes is None else float(nbytes)],
                        dtype=torch.float64, device=device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rows = [mine]
    if world > 1:
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine)
    values = torch.stack(rows).cpu().tolist()
    return {"seconds": [None if s == UNKNOWN else round(s, 3) for s, _ in values],
            "read_bytes": [None if b == UNKNOWN else int(b) for _, b in values]}


def record_startup(step: int, device: torch.device, is_rank0: bool, run_dir: str,
                   message) -> Optional[dict]:
    """Gather, then on rank 0 append to ``run_dir/startup.jsonl`` and print a summary through
    ``message``; returns the record (rank 0) or None."""
    per_rank = gather_startup(device)
    if not is_rank0:
        return None
    record = {"step": step, "time": round(time.time(), 3), **per_rank}
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(run_dir) / "startup.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    seconds = [s for s in per_rank["seconds"] if s is not None]
    nbytes = [b for b in per_rank["read_bytes"] if b is not None]
    if seconds and nbytes:
        message(f"start-up: first step {max(seconds):.1f} s after the ranks started; "
                f"read from storage per rank: at most {max(nbytes) / 1e6:.1f} MB")
    return record


__all__ = ["gather_startup", "record_startup"]
