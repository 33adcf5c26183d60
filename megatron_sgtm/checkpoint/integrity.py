"""sha256 of every file of a checkpoint: recorded at save, verified before anything is loaded.

The record lives in ``sgtm_meta.json`` as ``files: {relative path: {"sha256", "bytes"}}`` and
covers every file of the step directory except the metadata itself. Checks catch silent
corruption on shared filesystems and files replaced after the save; they cannot tell who wrote
``sgtm_meta.json`` (that is what ``vetting.py`` is for).

Hashing is O(checkpoint size), so it streams in chunks, splits the files over the ranks of a
job (``shares``: every rank hashes about 1/world of the bytes), and hashes a rank's files on a
few threads (hashlib releases the GIL on large updates, so they run on separate cores).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

CHUNK_BYTES = 8 << 20  # large reads keep hashing near memory speed, small enough for any host
MAX_THREADS = 4


def list_files(directory: Path, exclude: Iterable[str] = ()) -> dict[str, int]:
    """Every regular file under ``directory`` (relative POSIX path -> size), sorted."""
    directory = Path(directory)
    skip = set(exclude)
    out = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if name in skip:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            # A link could point anywhere (and change later): a checkpoint holds real files.
            out[name] = -1
        elif path.is_file():
            out[name] = path.stat().st_size
    return out


def shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Split files over ``world`` ranks by bytes (largest first, to the lightest rank).

    Deterministic for a given listing, so every rank computes the same split."""
    load = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[rank].append(name)
        load[rank] += max(sizes[name], 0)
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def digests(directory: Path, names: Iterable[str]) -> dict[str, dict]:
    """``{name: {"sha256", "bytes"}}`` for the given files of ``directory``."""
    directory = Path(directory)
    names = list(names)

    def one(name: str) -> dict:
        return {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}

    threads = min(MAX_THREADS, os.cpu_count() or 1, len(names))
    if threads <= 1:
        return {name: one(name) for name in names}
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(names, pool.map(one, names)))


def listing_problems(recorded: dict[str, dict], present: dict[str, int]) -> list[str]:
    """Files missing, added, replaced by links, or of another size than recorded (cheap)."""
    out = []
    for name in sorted(set(recorded) | set(present)):
        if name not in present:
            out.append(f"{name}: missing (recorded in the checkpoint's metadata)")
        elif name not in recorded:
            out.append(f"{name}: not recorded in the checkpoint's metadata (added after the save)")
        elif present[name] < 0:
            out.append(f"{name}: not a regular file (a link?)")
        elif present[name] != recorded[name].get("bytes"):
            out.append(f"{name}: {present[name]} bytes, recorded {recorded[name].get('bytes')}")
    return out


def digest_problems(directory: Path, recorded: dict[str, dict], names: Iterable[str]) -> list[str]:
    """sha256 mismatches among ``names`` (the files this rank checks)."""
    out = []
    for name, found in digests(directory, names).items():
        want = recorded[name].get("sha256")
        if found["sha256"] != want:
            out.append(f"{name}: sha256 {found['sha256'][:16]}... differs from the recorded "
                       f"{str(want)[:16]}...")
    return out


def summary(problems: list[str], directory: Path) -> str:
    """One message for all problems, naming the first file; the checkpoint is never changed."""
    first, rest = problems[0], problems[1:]
    more = f" (and {len(rest)} more: {'; '.join(rest[:5])})" if rest else ""
    return (f"{directory}: integrity check failed: {first}{more}. The file changed after the "
            "checkpoint was saved (corruption or tampering); nothing was loaded and the "
            "checkpoint was left as it is")
