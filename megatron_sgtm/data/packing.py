"""Label-homogeneous packing of documents into fixed-length training samples (pure numpy).

Per applied label, the label's documents are concatenated in a seeded shuffled order and the
stream is cut into samples of ``seq_length + 1`` tokens (inputs ``[:-1]``, targets ``[1:]``);
the tail shorter than one sample is dropped. A sample therefore never mixes labels, which is
what keeps forget information out of retain gradients under causal attention (SGTM.md 3).

A sample is a run of pieces ``(doc, start, stop)`` (token offsets inside the document); the
index stores them as flat arrays with a CSR pointer per sample, so millions of samples cost a
few arrays and can be cached on disk (memory-mapped when read back, so a restart reads only
the entries its steps use).

Documents whose tokens carry different labels (paragraph-level labels) are first split at
every label change into label-homogeneous *units* (``units=(unit_doc, unit_start)``, with
lengths/labels/truth given per unit). Each unit is then packed like a document of its own, so
a retain-labelled paragraph never shares a sequence, and so attention, with the forget
paragraph before it. Consecutive same-label paragraphs stay one unit (their context is kept);
a unit cut from inside a document has no end-of-document token of its own.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .facts import advise_random

CACHE_VERSION = 2
_ARRAYS = ("sample_label", "routing_label", "sample_truth", "piece_ptr", "piece_doc",
           "piece_start", "piece_stop")
NUM_TRUTH = 3


@dataclass(frozen=True)
class PackedIndex:
    seq_length: int
    sample_label: np.ndarray  # int64 [n], applied label of every document in the sample
    routing_label: np.ndarray  # int64 [n], label the model routes by (0 for non-routing methods)
    sample_truth: np.ndarray  # int64 [n], majority true domain by tokens (ties: lowest id)
    piece_ptr: np.ndarray  # int64 [n + 1], sample i owns pieces piece_ptr[i]:piece_ptr[i+1]
    piece_doc: np.ndarray  # int64 [P]
    piece_start: np.ndarray  # int64 [P], offset inside the document
    piece_stop: np.ndarray  # int64 [P]
    dropped_docs: int = 0  # documents removed by the data filter

    @property
    def num_samples(self) -> int:
        return len(self.sample_label)

    def pieces(self, sample: int) -> list[tuple[int, int, int]]:
        a, b = self.piece_ptr[sample], self.piece_ptr[sample + 1]
        return [(int(d), int(s), int(e)) for d, s, e in
                zip(self.piece_doc[a:b], self.piece_start[a:b], self.piece_stop[a:b])]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in _ARRAYS}


def _cut(doc_ids: np.ndarray, lengths: np.ndarray, sample_len: int):
    """Pieces of the concatenated stream of ``doc_ids`` cut every ``sample_len`` tokens."""
    cum = np.concatenate([[0], np.cumsum(lengths[doc_ids])])
    n = int(cum[-1]) // sample_len
    end = n * sample_len
    if n == 0:
        empty = np.zeros(0, np.int64)
        return 0, empty, empty, empty, empty
    # Piece boundaries: every document boundary and every sample boundary inside the kept part.
    cuts = np.union1d(cum[cum < end], np.arange(0, end, sample_len, dtype=np.int64))
    stops = np.append(cuts[1:], end)
    owner = np.searchsorted(cum, cuts, side="right") - 1
    docs = doc_ids[owner]
    return n, cuts // sample_len, docs, cuts - cum[owner], stops - cum[owner]


def build_packing(doc_lengths: np.ndarray, doc_labels: np.ndarray, seq_length: int, seed: int,
                  doc_truth: Optional[np.ndarray] = None, drop_labels: Iterable[int] = (),
                  drop_truth: Iterable[int] = (), route: bool = True,
                  units: Optional[tuple[np.ndarray, np.ndarray]] = None) -> PackedIndex:
    """Pack documents into label-homogeneous samples of ``seq_length + 1`` tokens.

    ``drop_labels``/``drop_truth`` remove documents by applied label / true domain before
    packing (the data filters). ``route=False`` gives every sample routing label 0. With
    ``units=(unit_doc, unit_start)`` the first three arrays describe units (pieces of
    documents) instead of documents; the index still names documents and offsets in them.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    labels = np.asarray(doc_labels, dtype=np.int64)
    truth = np.zeros_like(labels) if doc_truth is None else np.asarray(doc_truth, np.int64)
    if not (len(lengths) == len(labels) == len(truth)):
        raise ValueError(f"doc arrays differ in length: {len(lengths)} lengths, {len(labels)} "
                         f"labels, {len(truth)} truth")
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    keep = ~np.isin(labels, list(drop_labels)) & ~np.isin(truth, list(drop_truth))
    sample_len = seq_length + 1
    parts = []
    base = 0
    for label in np.unique(labels[keep]):
        docs = np.flatnonzero(keep & (labels == label))
        # One stream per label with its own generator: adding a label's documents does not
        # reshuffle the other labels' streams.
        docs = np.random.default_rng([seed, int(label)]).permutation(docs)
        n, sample, pdoc, pstart, pstop = _cut(docs, lengths, sample_len)
        ptruth = truth[pdoc]
        if n and units is not None:
            unit_doc, unit_start = (np.asarray(a, np.int64) for a in units)
            pstart, pstop = pstart + unit_start[pdoc], pstop + unit_start[pdoc]
            pdoc = unit_doc[pdoc]
        if n:
            parts.append((int(label), n, sample + base, pdoc, pstart, pstop, ptruth))
            base += n
    if not parts:
        empty = np.zeros(0, np.int64)
        return PackedIndex(seq_length, empty, empty, empty, np.zeros(1, np.int64), empty,
                           empty, empty, int((~keep).sum()))
    sample_label = np.concatenate([np.full(n, lab, np.int64) for lab, n, *_ in parts])
    piece_sample = np.concatenate([p[2] for p in parts])
    piece_doc = np.concatenate([p[3] for p in parts])
    piece_start = np.concatenate([p[4] for p in parts])
    piece_stop = np.concatenate([p[5] for p in parts])
    counts = np.bincount(piece_sample, minlength=base)
    piece_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    votes = np.zeros((base, NUM_TRUTH), np.int64)
    piece_truth = np.concatenate([p[6] for p in parts])
    np.add.at(votes, (piece_sample, piece_truth), piece_stop - piece_start)
    routing = sample_label if route else np.zeros_like(sample_label)
    return PackedIndex(seq_length, sample_label, routing.copy(), votes.argmax(axis=1),
                       piece_ptr, piece_doc, piece_start, piece_stop, int((~keep).sum()))


def packing_key(doc_lengths, doc_labels, doc_truth, seq_length: int, seed: int,
                drop_labels=(), drop_truth=(), route: bool = True, units=None) -> str:
    h = hashlib.sha256()
    # Narrow types (lengths are int32 in the index, labels and truth take 0..2): a restart
    # hashes about 6 bytes per document.
    for arr, dtype in ((doc_lengths, np.int32), (doc_labels, np.uint8), (doc_truth, np.uint8),
                       *((u, np.int64) for u in (units or ()))):
        h.update(np.ascontiguousarray(np.asarray(arr, dtype=dtype)).tobytes())
        h.update(b"|")
    h.update(repr((CACHE_VERSION, int(seq_length), int(seed), sorted(drop_labels),
                   sorted(drop_truth), bool(route))).encode())
    return h.hexdigest()[:32]


def _load_cached(path: Path) -> PackedIndex:
    """The cached index as memory maps: opening reads the .npy headers only, and a step
    reads just the entries of its own samples (a restart's cost does not grow with the data)."""
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
              for name in (*_ARRAYS, "meta")}
    for name in _ARRAYS:  # a step reads a few entries of each, at its samples
        advise_random(arrays[name])
    meta = np.asarray(arrays.pop("meta"))
    index = PackedIndex(int(meta[0]), dropped_docs=int(meta[1]), **arrays)
    n, pieces = index.num_samples, len(index.piece_doc)
    if len(index.piece_ptr) != n + 1 or not len(index.routing_label) == len(index.sample_truth) == n or \
            not len(index.piece_start) == len(index.piece_stop) == pieces:
        raise ValueError(f"{path}: arrays of inconsistent lengths")
    return index


def cached_packing(cache_dir: Optional[Path], doc_lengths, doc_labels, doc_truth,
                   seq_length: int, seed: int, drop_labels=(), drop_truth=(),
                   route: bool = True, units=None) -> tuple[PackedIndex, str]:
    """``build_packing`` through an on-disk cache keyed by everything the index depends on.

    An entry is a directory of .npy files, written under a temporary name and renamed, so
    concurrent ranks and interrupted writers never leave a half-written index behind (the
    first rename wins; the others drop theirs). A cached index is memory-mapped. An
    unwritable cache directory only costs the rebuild; an unreadable entry is rebuilt.
    """
    key = packing_key(doc_lengths, doc_labels, doc_truth, seq_length, seed, drop_labels,
                      drop_truth, route, units)
    path = None if cache_dir is None else Path(cache_dir) / f"packing_{key}"
    if path is not None and path.is_dir():
        try:
            return _load_cached(path), key
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(path, ignore_errors=True)  # unreadable: rebuild and replace it
    index = build_packing(doc_lengths, doc_labels, seq_length, seed, doc_truth, drop_labels,
                          drop_truth, route, units)
    if path is not None:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            for name, arr in {**index.arrays(),
                              "meta": np.array([index.seq_length, index.dropped_docs], np.int64)}.items():
                np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
            os.rename(tmp, path)
            tmp = None
        except OSError:
            pass  # unwritable, or another rank renamed its copy first
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return index, key
