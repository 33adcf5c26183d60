"""What this process has read from storage, and how long it has run: the measures behind
"bytes read per rank at start" (Linux ``/proc``; None elsewhere).

``read_bytes`` is the kernel's count of bytes this process caused to be fetched from the
storage layer (``/proc/self/io``): a read served from the page cache costs nothing, a page
pulled in by readahead counts although nobody asked for it. ``evict`` drops files from the
page cache (``POSIX_FADV_DONTNEED``, after an fsync so no dirty page stays behind), so the next
read of them is a cold one.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Optional


def read_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def seconds_since_start() -> Optional[float]:
    """Wall seconds since this process started (its start time in ``/proc/self/stat``)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)


def evict(paths: Iterable[Path]) -> int:
    """Drop every file in ``paths`` (files, or directories taken recursively) from the page
    cache; returns the bytes of the files evicted."""
    total = 0
    for path in paths:
        path = Path(path)
        for f in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


class ReadMeter:
    """Bytes read from storage and seconds elapsed since it was made."""

    def __init__(self) -> None:
        self.start_bytes, self.t0 = read_bytes(), time.perf_counter()

    @property
    def bytes(self) -> Optional[int]:
        now = read_bytes()
        return None if now is None or self.start_bytes is None else now - self.start_bytes

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


__all__ = ["ReadMeter", "evict", "read_bytes", "seconds_since_start"]
