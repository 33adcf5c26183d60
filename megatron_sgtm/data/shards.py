"""Read and validate one split of a data_prep shard directory, as one dataset.

Layout (see data_prep/shards.py), per prefix ``P``: ``P_tokens.bin/.idx`` one IndexedDataset
entry per document, ``P_labels.bin/.idx`` uint8 applied label per token with identical entry
lengths, ``P_truth.npy`` uint8 true domain per document, ``P_scores.npy`` float32 score per
document, optionally ``P_span_lengths.npy`` + ``P_span_truth.npy`` (paragraph spans tiling the
documents, with their truth), and ``manifest.json``. A split is the prefix ``S`` itself, or,
when the manifest lists ``splits.S.shards``, every listed prefix in order: each is validated
on its own (and against the manifest's counts), then presented as one concatenated dataset.

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


def _doc_array(path: Path, n: Optional[int], dtype, required: bool) -> Optional[np.ndarray]:
    if not path.is_file():
        if required:
            raise DataError(f"{path}: missing")
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if arr.ndim != 1 or (n is not None and len(arr) != n):
        raise DataError(f"{path}: shape {arr.shape}, expected ({n},) (one value per document)")
    return arr.astype(dtype, copy=False)


@dataclass
class ShardSplit:
    """One validated split (one or many shard prefixes). Token access is through memory maps;
    nothing large is loaded."""

    directory: Path
    split: str
    manifest: dict
    doc_lengths: np.ndarray  # int64 [docs]
    doc_offsets: np.ndarray  # int64 [docs], token offset of each document in the flat stream
    doc_labels: np.ndarray  # int64 [docs], applied label (max over the document's tokens)
    doc_truth: np.ndarray  # int64 [docs], true domain
    doc_scores: Optional[np.ndarray]  # float32 [docs] or None when the file is absent
    tokens: np.ndarray = field(repr=False)  # flat memmap (or FlatConcat) of all token ids
    labels: np.ndarray = field(repr=False)  # flat memmap (or FlatConcat) of per-token labels
    # Documents whose tokens carry more than one label; doc_labels takes their max so a
    # partly forget-labelled document is never trained as retain or unlabeled (where
    # documents are used whole), and training packs their label runs apart (``units``).
    mixed_label_docs: int = 0
    # Paragraph spans (paragraph-granularity prep): flat token offset and truth of each.
    span_offsets: Optional[np.ndarray] = field(default=None, repr=False)
    span_truth: Optional[np.ndarray] = field(default=None, repr=False)
    prefixes: tuple[str, ...] = ()
    doc_label_min: Optional[np.ndarray] = field(default=None, repr=False)  # int64 [docs]

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

    def truth_at(self, pos: np.ndarray) -> np.ndarray:
        """True domain of the tokens at flat positions ``pos`` (a paragraph's own truth when
        the split has spans, else its document's)."""
        pos = np.asarray(pos, np.int64)
        if self.span_offsets is not None:
            return self.span_truth[np.searchsorted(self.span_offsets, pos, side="right") - 1]
        return self.doc_truth[np.searchsorted(self.doc_offsets, pos, side="right") - 1]

    def units(self) -> Optional[tuple[np.ndarray, ...]]:
        """Label-homogeneous pieces for packing, or None when every document has one label:
        ``(unit_doc, unit_start, unit_length, unit_label, unit_truth)``; a mixed document is
        split at every label change, the others stay whole. A unit's truth is the majority
        (by tokens) of its tokens' truth."""
        if self.mixed_label_docs == 0:
            return None
        from .concat import label_changes

        starts = np.union1d(self.doc_offsets, label_changes(self.labels, self.num_tokens))
        doc = np.searchsorted(self.doc_offsets, starts, side="right") - 1
        start = starts - self.doc_offsets[doc]
        length = np.diff(np.append(starts, self.num_tokens))
        label = self.labels[starts].astype(np.int64)
        if self.span_offsets is None:
            truth = self.doc_truth[doc]
        else:  # labels change only at span boundaries, so each unit is whole spans
            unit_of_span = np.searchsorted(starts, self.span_offsets, side="right") - 1
            votes = np.zeros((len(starts), TRUTH_MAX + 1), np.int64)
            span_len = np.diff(np.append(self.span_offsets, self.num_tokens))
            np.add.at(votes, (unit_of_span, self.span_truth), span_len)
            truth = votes.argmax(axis=1)
        return doc, start, length, label, truth


def _flat_memmap(prefix: Path, dtype) -> np.ndarray:
    return np.memmap(prefix.with_suffix(".bin"), dtype=dtype, mode="r")


@dataclass
class _Prefix:
    lengths: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray
    labels: np.ndarray
    doc_max: np.ndarray
    doc_min: np.ndarray
    truth: np.ndarray
    scores: Optional[np.ndarray]
    span_lengths: Optional[np.ndarray]
    span_truth: Optional[np.ndarray]


def _open_prefix(directory: Path, prefix: str, manifest: dict, expect: Optional[dict]) -> _Prefix:
    vocab = int(manifest["tokenizer"]["vocab_size"])
    tok_prefix, lab_prefix = directory / f"{prefix}_tokens", directory / f"{prefix}_labels"
    tok_ds = _open_indexed(tok_prefix)
    lengths, offsets = _check_index(tok_ds, tok_prefix)
    if expect is not None and (len(lengths), int(lengths.sum())) != (expect.get("num_docs"), expect.get("num_tokens")):
        raise DataError(f"{tok_prefix}.idx: {len(lengths)} documents / {int(lengths.sum())} tokens, but "
                        f"the manifest lists {expect.get('num_docs')} / {expect.get('num_tokens')} for "
                        f"shard {prefix} (the shard was replaced after prep finished)")
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

    truth = _doc_array(directory / f"{prefix}_truth.npy", len(lengths), np.int64, required=True)
    if truth.min() < 0 or truth.max() > TRUTH_MAX:
        raise DataError(f"{directory / f'{prefix}_truth.npy'}: values outside 0/1/2")
    scores = _doc_array(directory / f"{prefix}_scores.npy", len(lengths), np.float32,
                        required=False)
    span_lengths = span_truth = None
    span_path = directory / f"{prefix}_span_lengths.npy"
    if span_path.is_file():
        span_lengths = _doc_array(span_path, None, np.int64, required=True)
        ends = np.cumsum(span_lengths)
        if (span_lengths <= 0).any() or ends[-1] != lengths.sum() or \
                not np.isin(np.cumsum(lengths), ends).all():
            raise DataError(f"{span_path}: paragraph spans do not tile the documents of {tok_prefix}.idx")
        span_truth = _doc_array(directory / f"{prefix}_span_truth.npy", len(span_lengths), np.int64,
                                required=True)
        if span_truth.min() < 0 or span_truth.max() > TRUTH_MAX:
            raise DataError(f"{directory / f'{prefix}_span_truth.npy'}: values outside 0/1/2")
    return _Prefix(lengths, offsets, tokens, labels, doc_max, doc_min, truth, scores,
                   span_lengths, span_truth)


def split_prefixes(manifest: dict, split: str) -> list[tuple[str, Optional[dict]]]:
    """The shard prefixes of ``split`` with their manifest entries (one bare prefix when the
    manifest lists none)."""
    entries = ((manifest.get("splits") or {}).get(split) or {}).get("shards")
    if not entries:
        return [(split, None)]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("prefix"), str)
                                                for e in entries):
        raise DataError(f"manifest: splits.{split}.shards must be a list of {{prefix, ...}} entries")
    return [(e["prefix"], e) for e in entries]


def open_split(directory, split: str) -> ShardSplit:
    """Open and validate ``split`` of the shard directory ``directory`` (all of its shards)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    manifest = read_manifest(directory)
    listed = split_prefixes(manifest, split)
    parts = [_open_prefix(directory, prefix, manifest, expect) for prefix, expect in listed]
    from .concat import FlatConcat

    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        if any(a is None for a in arrays):
            return None
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    lengths = cat("lengths")
    tok_base = np.concatenate([[0], np.cumsum([int(p.lengths.sum()) for p in parts])[:-1]])
    offsets = np.concatenate([p.offsets + b for p, b in zip(parts, tok_base)]) if len(parts) > 1 else parts[0].offsets
    tokens = parts[0].tokens if len(parts) == 1 else FlatConcat([p.tokens for p in parts])
    labels = parts[0].labels if len(parts) == 1 else FlatConcat([p.labels for p in parts])
    doc_max, doc_min = cat("doc_max"), cat("doc_min")
    span_lengths = cat("span_lengths")
    if span_lengths is None and any(p.span_lengths is not None for p in parts):
        raise DataError(f"{directory}: split {split!r} has paragraph spans in some shards only")
    span_offsets = None if span_lengths is None else np.concatenate([[0], np.cumsum(span_lengths)[:-1]])
    return ShardSplit(directory=directory, split=split, manifest=manifest, doc_lengths=lengths,
                      doc_offsets=offsets, doc_labels=doc_max, doc_truth=cat("truth"),
                      doc_scores=cat("scores"), tokens=tokens, labels=labels,
                      mixed_label_docs=int((doc_max != doc_min).sum()),
                      span_offsets=span_offsets, span_truth=cat("span_truth"),
                      prefixes=tuple(p for p, _ in listed), doc_label_min=doc_min)
