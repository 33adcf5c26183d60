"""Read and validate one split of a shard directory (the format ``sgtm prep`` writes).

Everything is checked before training starts, each problem named with its file: a missing or
unreadable manifest, missing files, a ``.bin`` whose size disagrees with its index (truncated
or corrupt), a label sidecar whose documents differ from the token file's, label codes other
than 0/1/2, token ids outside the vocabulary, truth/score arrays of the wrong length.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Shards that cannot be trained on; the message names the file and the problem."""


@dataclass
class ShardSplit:
    directory: Path
    split: str
    manifest: dict
    doc_lengths: np.ndarray      # int64 tokens per document (EOD included)
    doc_offsets: np.ndarray      # int64 first token of each document in ``tokens``
    tokens: np.ndarray           # flat token stream (memory-mapped)
    token_labels: np.ndarray     # flat uint8 applied label per token (memory-mapped)
    doc_labels: np.ndarray       # int64 applied label per document (max over its tokens)
    doc_truth: np.ndarray        # int64 true domain per document (0 retain, 1 forget, 2 adjacent)
    mixed_label_docs: int = 0    # documents whose tokens carry more than one label
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def get_tokens(self, doc: int) -> np.ndarray:
        start = int(self.doc_offsets[doc])
        return np.asarray(self.tokens[start:start + int(self.doc_lengths[doc])])


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; {directory} is not a finished `sgtm prep` output")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _index(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    idx = prefix.with_suffix(".idx")
    bin_path = prefix.with_suffix(".bin")
    for path in (idx, bin_path):
        if not path.is_file():
            raise DataError(f"{path}: missing")
    if bin_path.stat().st_size == 0 and idx.stat().st_size == 0:
        raise DataError(f"{idx}: empty index")
    try:
        index = IndexedDataset(str(prefix), mmap=bin_path.stat().st_size > 0).index
    except Exception as exc:  # megatron raises bare assertions/struct errors on bad headers
        raise DataError(f"{idx}: unreadable index ({type(exc).__name__}: {exc})") from None
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
    itemsize = np.dtype(index.dtype).itemsize
    expected = int(lengths.sum()) * itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise DataError(f"{bin_path}: {actual} bytes but its index describes {expected} "
                        "(truncated or corrupt shard)")
    if len(pointers) and not np.array_equal(pointers, np.concatenate(
            [[0], np.cumsum(lengths[:-1] * itemsize)])):
        raise DataError(f"{idx}: documents are not stored contiguously; re-run `sgtm prep`")
    flat = (np.memmap(bin_path, dtype=index.dtype, mode="r") if actual
            else np.zeros(0, index.dtype))
    return lengths, flat


def open_split(directory: str | Path, split: str) -> ShardSplit:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such shard directory")
    manifest = read_manifest(directory)
    lengths, tokens = _index(directory / f"{split}_tokens")
    label_lengths, labels = _index(directory / f"{split}_labels")
    if not np.array_equal(lengths, label_lengths):
        raise DataError(f"{directory / (split + '_labels.idx')}: the label sidecar's documents "
                        f"({len(label_lengths)}) do not match {split}_tokens ({len(lengths)}) "
                        "in number or length")
    if labels.size and int(labels.max()) > 2:
        raise DataError(f"{directory / (split + '_labels.bin')}: label codes other than 0/1/2")
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    if vocab is not None and tokens.size and int(tokens.max()) >= int(vocab):
        raise DataError(f"{directory / (split + '_tokens.bin')}: token id {int(tokens.max())} "
                        f"outside the manifest's vocabulary of {vocab}")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    doc_labels = np.zeros(len(lengths), np.int64)
    mixed = 0
    if len(lengths):
        nonempty = lengths > 0
        starts = offsets[nonempty]
        doc_labels[nonempty] = np.maximum.reduceat(labels.astype(np.int64), starts)
        mins = np.minimum.reduceat(labels.astype(np.int64), starts)
        mixed = int((mins != doc_labels[nonempty]).sum())
    truth = _per_doc(directory / f"{split}_truth.npy", len(lengths), np.int64)
    scores = _per_doc(directory / f"{split}_scores.npy", len(lengths), np.float32)
    return ShardSplit(directory, split, manifest, lengths, offsets, tokens, labels, doc_labels,
                      truth, mixed, scores)


def _per_doc(path: Path, n: int, dtype) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        values = np.load(path)
    except Exception as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if values.shape != (n,):
        raise DataError(f"{path}: {values.shape} entries for {n} documents")
    return values.astype(dtype)
