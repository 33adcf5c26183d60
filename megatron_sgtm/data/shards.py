"""Read and validate one split of a data_prep shard directory.

Layout (see data_prep/shards.py): ``S_tokens.bin/.idx`` one IndexedDataset entry per document,
``S_labels.bin/.idx`` uint8 applied label per token with identical entry lengths,
``S_truth.npy`` uint8 true domain per document, ``S_scores.npy`` float32 score per document,
and ``manifest.json``.

Every check is vectorised over the index arrays or a memory map of the .bin, so opening a
multi-billion-token split costs one linear scan of the token file (the vocabulary bound), not a
Python loop over documents. Any problem raises ``DataError`` naming the file.
"""
from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

LABEL_MAX = 2  # 0 unlabeled, 1 retain, 2 forget
TRUTH_MAX = 2  # 0 retain, 1 forget, 2 adjacent


class DataError(ValueError):
    """A shard directory or split that cannot be used; the message names the file."""


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing (not a finished `sgtm prep` output directory)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: manifest is not a JSON object")
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise DataError(f"{path}: tokenizer.vocab_size missing or not a positive integer")
    return manifest


def _open_indexed(prefix: Path):
    for suffix in (".idx", ".bin"):
        if not prefix.with_suffix(suffix).is_file():
            raise DataError(f"{prefix.with_suffix(suffix)}: missing")
    if prefix.with_suffix(".bin").stat().st_size == 0:
        raise DataError(f"{prefix.with_suffix('.bin')}: empty (a split needs documents)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # megatron's fused-kernel notices
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    try:
        return IndexedDataset(str(prefix), mmap=True)
    except (AssertionError, ValueError, OSError, struct.error) as exc:
        raise DataError(f"{prefix.with_suffix('.idx')}: unreadable index ({exc or type(exc).__name__})"
                        ) from None


def _check_index(ds, prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64, byte offsets int64) after checking the .bin holds exactly them."""
    idx, bin_path = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    lengths = np.asarray(ds.index.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(ds.index.sequence_pointers, dtype=np.int64)
    itemsize = np.dtype(ds.index.dtype).itemsize
    if len(lengths) == 0:
        raise DataError(f"{idx}: no documents")
    if (lengths <= 0).any():
        raise DataError(f"{idx}: {int((lengths <= 0).sum())} empty documents (every document "
                        "ends in an end-of-document token)")
    expected = np.concatenate([[0], np.cumsum(lengths[:-1])]) * itemsize
    if not np.array_equal(pointers, expected):
        raise DataError(f"{idx}: document pointers are not contiguous (corrupt index)")
    want, have = int(lengths.sum()) * itemsize, bin_path.stat().st_size
    if have != want:
        raise DataError(f"{bin_path}: {have} bytes but the index describes {want} "
                        f"({'truncated' if have < want else 'trailing data'})")
    return lengths, expected // itemsize


def _doc_array(path: Path, n: int, dtype, required: bool) -> Optional[np.ndarray]:
    if not path.is_file():
        if required:
            raise DataError(f"{path}: missing")
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"{path}: shape {arr.shape}, expected ({n},) (one value per document)")
    return arr.astype(dtype, copy=False)


@dataclass
class ShardSplit:
    """One validated split. Token access is through memory maps; nothing large is loaded."""

    directory: Path
    split: str
    manifest: dict
    doc_lengths: np.ndarray  # int64 [docs]
    doc_offsets: np.ndarray  # int64 [docs], token offset of each document in the flat stream
    doc_labels: np.ndarray  # int64 [docs], applied label (max over the document's tokens)
    doc_truth: np.ndarray  # int64 [docs], true domain
    doc_scores: Optional[np.ndarray]  # float32 [docs] or None when the file is absent
    tokens: np.ndarray = field(repr=False)  # flat memmap of all token ids
    labels: np.ndarray = field(repr=False)  # flat memmap of per-token applied labels
    # Documents whose tokens carry more than one label; doc_labels takes their max so a
    # partly forget-labelled document is never trained as retain or unlabeled.
    mixed_label_docs: int = 0

    @property
    def num_docs(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def get_tokens(self, doc: int) -> np.ndarray:
        start = int(self.doc_offsets[doc])
        return np.asarray(self.tokens[start:start + int(self.doc_lengths[doc])])

    def get_labels(self, doc: int) -> np.ndarray:
        start = int(self.doc_offsets[doc])
        return np.asarray(self.labels[start:start + int(self.doc_lengths[doc])])


def _flat_memmap(prefix: Path, dtype) -> np.ndarray:
    return np.memmap(prefix.with_suffix(".bin"), dtype=dtype, mode="r")


def open_split(directory, split: str) -> ShardSplit:
    """Open and validate ``split`` of the shard directory ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    manifest = read_manifest(directory)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    tok_prefix, lab_prefix = directory / f"{split}_tokens", directory / f"{split}_labels"

    tok_ds = _open_indexed(tok_prefix)
    lengths, offsets = _check_index(tok_ds, tok_prefix)
    tok_dtype = np.dtype(tok_ds.index.dtype)
    declared = manifest.get("token_dtype")
    if declared is not None and np.dtype(declared) != tok_dtype:
        raise DataError(f"{tok_prefix}.idx: dtype {tok_dtype.name} but the manifest says {declared}")

    lab_ds = _open_indexed(lab_prefix)
    lab_lengths, _ = _check_index(lab_ds, lab_prefix)
    if np.dtype(lab_ds.index.dtype) != np.uint8:
        raise DataError(f"{lab_prefix}.idx: dtype {np.dtype(lab_ds.index.dtype).name}, expected uint8")
    if len(lab_lengths) != len(lengths):
        raise DataError(f"{lab_prefix}.idx: {len(lab_lengths)} entries but {tok_prefix}.idx has "
                        f"{len(lengths)} documents")
    differ = np.flatnonzero(lab_lengths != lengths)
    if len(differ):
        d = int(differ[0])
        raise DataError(f"{lab_prefix}.idx: {len(differ)} entries differ in length from "
                        f"{tok_prefix}.idx (first: document {d}, {int(lab_lengths[d])} labels vs "
                        f"{int(lengths[d])} tokens)")

    tokens = _flat_memmap(tok_prefix, tok_dtype)
    top = int(tokens.max())
    if top >= vocab or (tok_dtype.kind == "i" and int(tokens.min()) < 0):
        raise DataError(f"{tok_prefix}.bin: token id {top if top >= vocab else int(tokens.min())} "
                        f"outside the manifest's vocabulary of {vocab}")
    labels = _flat_memmap(lab_prefix, np.uint8)
    doc_max = np.maximum.reduceat(labels, offsets).astype(np.int64)
    doc_min = np.minimum.reduceat(labels, offsets).astype(np.int64)
    if int(doc_max.max()) > LABEL_MAX:
        raise DataError(f"{lab_prefix}.bin: label {int(doc_max.max())} is not one of 0/1/2")

    truth = _doc_array(directory / f"{split}_truth.npy", len(lengths), np.int64, required=True)
    if truth.min() < 0 or truth.max() > TRUTH_MAX:
        raise DataError(f"{directory / f'{split}_truth.npy'}: values outside 0/1/2")
    scores = _doc_array(directory / f"{split}_scores.npy", len(lengths), np.float32,
                        required=False)
    return ShardSplit(directory=directory, split=split, manifest=manifest, doc_lengths=lengths,
                      doc_offsets=offsets, doc_labels=doc_max, doc_truth=truth,
                      doc_scores=scores, tokens=tokens, labels=labels,
                      mixed_label_docs=int((doc_max != doc_min).sum()))
