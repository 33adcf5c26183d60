"""What a shard directory records about each prefix, and the scans that establish it.

Prep records, per prefix (a train shard, a merged file or a held-out split), in the
manifest entry's ``facts``::

    token_min, token_max     smallest and largest token id
    label_range [lo, hi]     smallest and largest per-token label
    label_counts [n0, n1, n2] tokens per label (0 unlabeled, 1 retain, 2 forget)
    label_runs               rows of the label-run file (below)
    mixed_label_docs         documents whose tokens carry more than one label

next to ``num_docs``, ``num_tokens`` and ``files`` (bytes and sha256 of every file). The
*label-run file* ``P_label_runs.npy`` is the label sidecar run-length encoded: int64 rows
``[start, label]``, one per maximal run of equal labels, ``start`` the flat token offset
inside the prefix. It is small (16 bytes per run; a run per document at most, plus one per
label change inside a document) and gives each document's label range and the label units
of packing without reading a byte of the per-token sidecar.

So opening a split at training start reads the index files, the per-document arrays and the
run file, plus a few sampled pages of each ``.bin`` (``sample_spans``, read with readahead
off); the full scans here run at prep (on arrays already in memory; held-out splits, small,
from disk), in ``sgtm verify-data`` and, for directories prepped before facts were recorded,
at start.

The scanners take blocks in order, so one read of a file can feed its sha256 and its scan.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

RUNS_KIND = "label_runs"  # P_label_runs.npy
FACT_KEYS = ("token_min", "token_max", "label_range", "label_counts", "label_runs",
             "mixed_label_docs")
NUM_LABELS = 3
BLOCK = 1 << 24  # elements per scanned block
PAGE = 4096
SAMPLE_PAGES = 8  # at most this many pages of each .bin are read at start


def runs_name(prefix: str) -> str:
    return f"{prefix}_{RUNS_KIND}.npy"


def doc_offsets(lengths: np.ndarray) -> np.ndarray:
    """Token offset of every document in the flat stream."""
    lengths = np.asarray(lengths, np.int64)
    return np.cumsum(lengths) - lengths


class TokenScan:
    """Running min and max of token ids."""

    def __init__(self) -> None:
        self.lo: Optional[int] = None
        self.hi: Optional[int] = None

    def update(self, block: np.ndarray) -> None:
        if len(block):
            lo, hi = int(block.min()), int(block.max())
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)

    def facts(self) -> dict:
        return {"token_min": self.lo, "token_max": self.hi}


class RunScan:
    """Maximal runs of equal labels, from the label stream given block by block."""

    def __init__(self) -> None:
        self.n = 0
        self._starts: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._last: Optional[int] = None

    def update(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if not len(block):
            return
        change = np.flatnonzero(block[1:] != block[:-1]) + 1
        if self._last is None or int(block[0]) != self._last:
            change = np.concatenate([[0], change])
        self._starts.append(change.astype(np.int64) + self.n)
        self._values.append(block[change].astype(np.int64))
        self._last = int(block[-1])
        self.n += len(block)

    def runs(self) -> np.ndarray:
        if not self._starts:
            return np.zeros((0, 2), np.int64)
        return np.stack([np.concatenate(self._starts), np.concatenate(self._values)], axis=1)


def scan(array, scanner, block: int = BLOCK):
    """Feed a 1-D array (a memory map) to ``scanner`` in bounded blocks; returns it."""
    for a in range(0, len(array), block):
        scanner.update(np.asarray(array[a:a + block]))
    return scanner


def label_runs(labels, block: int = BLOCK) -> np.ndarray:
    return scan(labels, RunScan(), block).runs()


def check_runs(runs: np.ndarray, n_tokens: int) -> Optional[str]:
    """Why ``runs`` cannot be the run file of ``n_tokens`` labels, or None."""
    if runs.ndim != 2 or runs.shape[1] != 2 or runs.dtype != np.int64:
        return f"shape {runs.shape} dtype {runs.dtype}, expected (runs, 2) int64"
    if n_tokens == 0:
        return None if len(runs) == 0 else "runs for an empty prefix"
    starts, values = runs[:, 0], runs[:, 1]
    if len(runs) == 0 or starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= n_tokens:
        return f"run starts are not increasing from 0 below {n_tokens} tokens"
    if values.min() < 0 or values.max() >= NUM_LABELS:
        return f"label {int(values.max() if values.max() >= NUM_LABELS else values.min())} is not one of 0/1/2"
    if (values[1:] == values[:-1]).any():
        return "adjacent runs carry the same label (runs are not maximal)"
    return None


def doc_label_range(runs: np.ndarray, doc_offsets: np.ndarray,
                    doc_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) label of every document (int64), from the runs it overlaps: one binary
    search per run (runs are at most as many as documents, plus the label changes inside
    them), and a range query only for the documents that span several runs."""
    starts, values = np.ascontiguousarray(runs[:, 0]), np.ascontiguousarray(runs[:, 1])
    # A document's first run: the last run starting at or before it. Run j starts at or
    # before every document from the first one at or after its start on.
    at = np.searchsorted(doc_offsets, starts, side="left")
    first = np.cumsum(np.bincount(at, minlength=len(doc_offsets) + 1)[:len(doc_offsets)]) - 1
    # A document's last run: the next document's first, unless that run starts exactly there.
    follows = np.append(first[1:], len(runs))
    own_start = np.append(starts[first[1:]] == doc_offsets[1:], True)
    last = follows - own_start
    doc_min, doc_max = values[first].astype(np.int64), values[first].astype(np.int64)
    several = np.flatnonzero(last > first)
    if len(several):
        present = np.zeros((len(several), NUM_LABELS), bool)
        for k in range(NUM_LABELS):  # label k occurs in runs first..last
            count = np.concatenate([[0], np.cumsum(values == k)])
            present[:, k] = count[last[several] + 1] - count[first[several]] > 0
        doc_min[several] = np.argmax(present, axis=1)
        doc_max[several] = NUM_LABELS - 1 - np.argmax(present[:, ::-1], axis=1)
    return doc_min, doc_max


def run_labels_at(runs: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The label at flat ``positions`` according to ``runs``."""
    return runs[np.searchsorted(runs[:, 0], positions, side="right") - 1, 1]


def label_facts(runs: np.ndarray, n_tokens: int, doc_range: tuple[np.ndarray, np.ndarray]) -> dict:
    """The label facts of a prefix from its runs and its documents' (min, max) labels."""
    lengths = np.diff(np.append(runs[:, 0], n_tokens))
    counts = [int(lengths[runs[:, 1] == k].sum()) for k in range(NUM_LABELS)]
    present = [k for k in range(NUM_LABELS) if counts[k]]
    doc_min, doc_max = doc_range
    return {"label_range": [present[0], present[-1]] if present else None,
            "label_counts": counts, "label_runs": int(len(runs)),
            "mixed_label_docs": int((doc_min != doc_max).sum())}


def merge_runs(parts: Iterable[tuple[np.ndarray, int]]) -> np.ndarray:
    """The run file of prefixes concatenated in order (``(runs, num_tokens)`` each): runs
    shifted by the tokens before them, a run continued across a boundary kept as one."""
    out, base, last = [], 0, None
    for runs, n in parts:
        runs = runs.copy()
        runs[:, 0] += base
        if len(runs) and last is not None and runs[0, 1] == last:
            runs = runs[1:]
        if len(runs):
            out.append(runs)
            last = int(runs[-1, 1])
        base += n
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def merge_facts(parts: list[dict], runs: np.ndarray) -> dict:
    """Facts of prefixes concatenated in order; ``runs`` is their merged run file."""
    ranges = [p["label_range"] for p in parts if p["label_range"] is not None]
    return {"token_min": min(p["token_min"] for p in parts),
            "token_max": max(p["token_max"] for p in parts),
            "label_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None,
            "label_counts": [sum(p["label_counts"][k] for p in parts) for k in range(NUM_LABELS)],
            "label_runs": int(len(runs)),
            "mixed_label_docs": sum(p["mixed_label_docs"] for p in parts)}


def scan_prefix(tokens, labels, doc_offsets: np.ndarray, doc_lengths: np.ndarray):
    """(facts, runs) of one prefix by a full scan of its token and label arrays."""
    runs = label_runs(labels)
    found = scan(tokens, TokenScan()).facts()
    found.update(label_facts(runs, len(labels), doc_label_range(runs, doc_offsets, doc_lengths)))
    return found, runs


def combined_sha256(entries: list[dict], kind: str) -> str:
    """The manifest's ``tokens_sha256`` / ``label_sidecar_sha256`` of a split of listed
    shards (``kind`` tokens / labels): sha256 over the shards' .bin then .idx sha256 hex
    digests, in shard order."""
    h = hashlib.sha256()
    for e in entries:
        for ext in ("bin", "idx"):
            h.update(e["files"][f"{e['prefix']}_{kind}.{ext}"]["sha256"].encode())
    return h.hexdigest()


# ---------------------------------------------------------------- sampled pages


def sample_spans(size: int, pages: int = SAMPLE_PAGES, page: int = PAGE) -> list[tuple[int, int]]:
    """(offset, length) of the pages read from a file of ``size`` bytes at start: the whole
    file when it has at most ``pages`` pages; else one page in 256, at least 2 and at most
    ``pages``, evenly spaced from the first page to the last (deterministic, so every start
    checks the same bytes; at most 0.4% of a file over 2 MB)."""
    n = -(-size // page)
    if n <= pages:
        return [(0, size)] if size else []
    k = max(2, min(pages, n // 256))
    picks = np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
    return [(int(p) * page, min(page, size - int(p) * page)) for p in picks]


def read_spans(path: Path, spans: list[tuple[int, int]]) -> list[bytes]:
    """Read exactly ``spans``: with readahead off, so a few pages cost a few pages of I/O
    (a memory-mapped read would pull the device's whole readahead window, often MBs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return [os.pread(fd, length, offset) for offset, length in spans]
    finally:
        os.close(fd)


def advise_random(array) -> None:
    """Readahead off for a memory map read at scattered positions (np.memmap, or a
    FlatConcat of them): a page fault reads its page, not the device's readahead window."""
    for part in getattr(array, "parts", [array]):
        mapped = getattr(part, "_mmap", None)  # np.memmap's mmap object
        if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)


__all__ = ["BLOCK", "FACT_KEYS", "RUNS_KIND", "RunScan", "TokenScan", "advise_random",
           "check_runs", "combined_sha256", "doc_label_range", "doc_offsets", "label_facts",
           "label_runs", "merge_facts", "merge_runs", "read_spans", "run_labels_at", "runs_name",
           "sample_spans", "scan", "scan_prefix"]
