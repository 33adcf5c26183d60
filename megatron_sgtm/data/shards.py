"""Read and validate one split of a data_prep shard directory, as one dataset.

Layout (see data_prep/shards.py), per prefix ``P``: ``P_tokens.bin/.idx`` one IndexedDataset
entry per document, ``P_labels.bin/.idx`` uint8 applied label per token with identical entry
lengths, ``P_label_runs.npy`` the labels run-length encoded (``facts.py``), ``P_truth.npy``
uint8 true domain per document, ``P_scores.npy`` float32 score per document, optionally
``P_span_lengths.npy`` + ``P_span_truth.npy`` (paragraph spans tiling the documents, with
their truth), and ``manifest.json``. A split is the prefix ``S`` itself, or, when the manifest
lists ``splits.S.shards``, every listed prefix in order: each is validated on its own (and
against the manifest's entry), then presented as one concatenated dataset.

Opening reads the index files, the per-document arrays and the run file, never the token
and label ``.bin`` files beyond a few sampled pages: prep recorded each prefix's facts (token
range, label counts and runs, sizes, sha256), and the checks here compare the cheap evidence
with them (sizes, index headers and entries, the run file, the sampled pages). What only a
full read can find (a changed byte outside the sampled pages, a sha256) is ``sgtm
verify-data``'s job (``verify.py``). A prefix whose manifest entry records no facts (prepped
by an older version) is scanned in full, as every start did before, and named in
``ShardSplit.unrecorded``. Any problem raises ``DataError`` naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import facts
from .index_file import IndexFile, read_index

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


def _open_indexed(prefix: Path) -> IndexFile:
    for suffix in (".idx", ".bin"):
        if not prefix.with_suffix(suffix).is_file():
            raise DataError(f"{prefix.with_suffix(suffix)}: missing")
    if prefix.with_suffix(".bin").stat().st_size == 0:
        raise DataError(f"{prefix.with_suffix('.bin')}: empty (a split needs documents)")
    try:
        return read_index(prefix.with_suffix(".idx"))
    except (ValueError, OSError) as exc:
        raise DataError(f"{prefix.with_suffix('.idx')}: unreadable index ({exc or type(exc).__name__})"
                        ) from None


def _check_index(ds: IndexFile, prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64, byte offsets int64) after checking the .bin holds exactly them."""
    idx, bin_path = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    lengths = np.asarray(ds.lengths, dtype=np.int64)
    pointers = np.asarray(ds.pointers, dtype=np.int64)
    itemsize = ds.dtype.itemsize
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


def _doc_array(path: Path, n: Optional[int], dtype, required: bool,
               ndim: int = 1) -> Optional[np.ndarray]:
    if not path.is_file():
        if required:
            raise DataError(f"{path}: missing")
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if arr.ndim != ndim or (n is not None and len(arr) != n):
        raise DataError(f"{path}: shape {arr.shape}, expected ({n},) (one value per document)")
    return arr if dtype is None else arr.astype(dtype, copy=False)


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
    # Maximal runs of equal labels over the flat stream, int64 [runs, 2] of (start, label).
    label_runs: Optional[np.ndarray] = field(default=None, repr=False)
    # Prefixes whose manifest entry records no facts: they were scanned in full.
    unrecorded: tuple[str, ...] = ()

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
        starts = np.union1d(self.doc_offsets, self.label_runs[:, 0])
        doc = np.searchsorted(self.doc_offsets, starts, side="right") - 1
        start = starts - self.doc_offsets[doc]
        length = np.diff(np.append(starts, self.num_tokens))
        label = facts.run_labels_at(self.label_runs, starts)
        if self.span_offsets is None:
            truth = self.doc_truth[doc]
        else:  # labels change only at span boundaries, so each unit is whole spans
            unit_of_span = np.searchsorted(starts, self.span_offsets, side="right") - 1
            votes = np.zeros((len(starts), TRUTH_MAX + 1), np.int64)
            span_len = np.diff(np.append(self.span_offsets, self.num_tokens))
            np.add.at(votes, (unit_of_span, self.span_truth), span_len)
            truth = votes.argmax(axis=1)
        return doc, start, length, label, truth

    def expect_random_reads(self) -> None:
        """Tell the kernel that the token and label maps are read at scattered positions (the
        training batches): a page fault then reads that page, not the device's readahead
        window. With an 8 MiB window (``read_ahead_kb``), a micro-batch of 8 sequences at
        random places otherwise reads about 8 MiB per sequence and file from a cold cache.
        Sequential readers (held-out batches, the post commands) keep the default."""
        facts.advise_random(self.tokens)
        facts.advise_random(self.labels)

    def scan_note(self) -> Optional[str]:
        """What opening cost because facts were missing, or None."""
        if not self.unrecorded:
            return None
        return (f"{self.directory}: {len(self.unrecorded)} of {len(self.prefixes)} prefixes of split "
                f"{self.split!r} record no facts (prepped by an older `sgtm prep`), so every "
                "start reads all of their token and label bytes on every rank; `sgtm prep "
                f"--relabel {self.directory}` records them (labels unchanged with the same policy)")


def _flat_memmap(prefix: Path, dtype) -> np.ndarray:
    return np.memmap(prefix.with_suffix(".bin"), dtype=dtype, mode="r")


@dataclass
class PrefixIndex:
    """One prefix's token and label files, their indexes checked against each other and
    against the manifest entry; the ``.bin`` files are memory maps, nothing read yet."""

    tok_prefix: Path
    lab_prefix: Path
    lengths: np.ndarray
    offsets: np.ndarray
    token_dtype: np.dtype
    tokens: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def open_index(directory: Path, prefix: str, manifest: dict, expect: Optional[dict]) -> PrefixIndex:
    """Read and check both index files of ``prefix`` (every entry: they are the index files
    a start may read), and the .bin sizes they imply."""
    tok_prefix, lab_prefix = directory / f"{prefix}_tokens", directory / f"{prefix}_labels"
    tok_ds = _open_indexed(tok_prefix)
    lengths, offsets = _check_index(tok_ds, tok_prefix)
    if expect is not None and "num_docs" in expect and \
            (len(lengths), int(lengths.sum())) != (expect.get("num_docs"), expect.get("num_tokens")):
        raise DataError(f"{tok_prefix}.idx: {len(lengths)} documents / {int(lengths.sum())} tokens, but "
                        f"the manifest lists {expect.get('num_docs')} / {expect.get('num_tokens')} for "
                        f"shard {prefix} (the shard was replaced after prep finished)")
    tok_dtype = tok_ds.dtype
    declared = manifest.get("token_dtype")
    if declared is not None and np.dtype(declared) != tok_dtype:
        raise DataError(f"{tok_prefix}.idx: dtype {tok_dtype.name} but the manifest says {declared}")

    lab_ds = _open_indexed(lab_prefix)
    lab_lengths, _ = _check_index(lab_ds, lab_prefix)
    if lab_ds.dtype != np.uint8:
        raise DataError(f"{lab_prefix}.idx: dtype {lab_ds.dtype.name}, expected uint8")
    if len(lab_lengths) != len(lengths):
        raise DataError(f"{lab_prefix}.idx: {len(lab_lengths)} entries but {tok_prefix}.idx has "
                        f"{len(lengths)} documents")
    differ = np.flatnonzero(lab_lengths != lengths)
    if len(differ):
        d = int(differ[0])
        raise DataError(f"{lab_prefix}.idx: {len(differ)} entries differ in length from "
                        f"{tok_prefix}.idx (first: document {d}, {int(lab_lengths[d])} labels vs "
                        f"{int(lengths[d])} tokens)")
    return PrefixIndex(tok_prefix, lab_prefix, lengths, offsets, tok_dtype,
                       _flat_memmap(tok_prefix, tok_dtype), _flat_memmap(lab_prefix, np.uint8))


def vocab_error(path: Path, lo: int, hi: int, vocab: int, how: str = "") -> Optional[DataError]:
    if hi >= vocab or lo < 0:
        return DataError(f"{path}: token id {hi if hi >= vocab else lo} outside the manifest's "
                         f"vocabulary of {vocab}{how}")
    return None


def _scanned(ix: PrefixIndex, vocab: int) -> np.ndarray:
    """A prefix without recorded facts (prepped before they were): every token and label
    byte is read, as every start did before."""
    tokens = facts.scan(ix.tokens, facts.TokenScan())
    err = vocab_error(ix.tok_prefix.with_suffix(".bin"), tokens.lo, tokens.hi, vocab)
    if err:
        raise err
    runs = facts.label_runs(ix.labels)
    if int(runs[:, 1].max()) > LABEL_MAX:
        raise DataError(f"{ix.lab_prefix}.bin: label {int(runs[:, 1].max())} is not one of 0/1/2")
    return runs


VERIFY_HINT = "the file changed after prep; `sgtm verify-data DIR` checks every byte"


def check_file_sizes(directory: Path, entry: dict) -> None:
    for name, rec in (entry.get("files") or {}).items():
        p = directory / name
        if not p.is_file():
            raise DataError(f"{p}: missing, but the manifest lists it")
        if p.stat().st_size != rec["bytes"]:
            raise DataError(f"{p}: {p.stat().st_size} bytes, the manifest records {rec['bytes']} "
                            f"({VERIFY_HINT})")


def load_runs(directory: Path, prefix: str, n_tokens: int) -> np.ndarray:
    path = directory / facts.runs_name(prefix)
    runs = _doc_array(path, None, None, required=True, ndim=2)
    why = facts.check_runs(runs, n_tokens)
    if why:
        raise DataError(f"{path}: {why}")
    return runs


def _check_recorded(directory: Path, prefix: str, ix: PrefixIndex, entry: dict, vocab: int,
                    runs: np.ndarray, doc_range: tuple[np.ndarray, np.ndarray]) -> None:
    """Check a prefix against its recorded facts: the run file (read already) and a few
    pages of each .bin (facts.sample_spans)."""
    rec = entry["facts"]
    tok_bin, lab_bin = ix.tok_prefix.with_suffix(".bin"), ix.lab_prefix.with_suffix(".bin")
    missing = [k for k in facts.FACT_KEYS if not isinstance(rec, dict) or rec.get(k) is None]
    if missing:
        raise DataError(f"manifest: the facts of {prefix} lack {', '.join(missing)} (a damaged "
                        "manifest; `sgtm prep --relabel DIR` records them again)")
    err = vocab_error(tok_bin, rec["token_min"], rec["token_max"], vocab, " (recorded at prep)")
    if err:
        raise err
    derived = facts.label_facts(runs, ix.num_tokens, doc_range)
    differ = sorted(k for k, v in derived.items() if rec.get(k) != v)
    if differ:
        raise DataError(f"{directory / facts.runs_name(prefix)}: "
                        + ", ".join(f"{k} {derived[k]}" for k in differ)
                        + " but the manifest records " + ", ".join(f"{rec.get(k)}" for k in differ)
                        + f" ({VERIFY_HINT})")
    spans = facts.sample_spans(tok_bin.stat().st_size)
    for (offset, _), raw in zip(spans, facts.read_spans(tok_bin, spans)):
        ids = np.frombuffer(raw, ix.token_dtype)
        bad = ids[(ids < rec["token_min"]) | (ids > rec["token_max"])]
        if len(bad):
            raise DataError(f"{tok_bin}: token id {int(bad[0])} near byte {offset} is outside the "
                            f"range [{rec['token_min']}, {rec['token_max']}] the manifest records "
                            f"({VERIFY_HINT})")
    spans = facts.sample_spans(lab_bin.stat().st_size)
    for (offset, _), raw in zip(spans, facts.read_spans(lab_bin, spans)):
        got = np.frombuffer(raw, np.uint8)
        if len(got) and int(got.max()) > LABEL_MAX:
            raise DataError(f"{lab_bin}: label {int(got.max())} is not one of 0/1/2")
        want = facts.run_labels_at(runs, np.arange(offset, offset + len(got)))
        if not np.array_equal(got, want):
            raise DataError(f"{lab_bin}: labels near byte {offset} differ from "
                            f"{directory / facts.runs_name(prefix)} ({VERIFY_HINT})")


@dataclass
class DocArrays:
    truth: np.ndarray
    scores: Optional[np.ndarray]
    span_lengths: Optional[np.ndarray]
    span_truth: Optional[np.ndarray]


def open_doc_arrays(directory: Path, prefix: str, ix: PrefixIndex) -> DocArrays:
    """The per-document (and per-span) sidecars of ``prefix``, checked against its index."""
    lengths = ix.lengths
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
            raise DataError(f"{span_path}: paragraph spans do not tile the documents of {ix.tok_prefix}.idx")
        span_truth = _doc_array(directory / f"{prefix}_span_truth.npy", len(span_lengths), np.int64,
                                required=True)
        if span_truth.min() < 0 or span_truth.max() > TRUTH_MAX:
            raise DataError(f"{directory / f'{prefix}_span_truth.npy'}: values outside 0/1/2")
    return DocArrays(truth, scores, span_lengths, span_truth)


@dataclass
class _Prefix:
    index: PrefixIndex
    runs: np.ndarray
    doc_max: np.ndarray
    doc_min: np.ndarray
    arrays: DocArrays
    recorded: bool  # checked against recorded facts (False: scanned in full)


def _open_prefix(directory: Path, prefix: str, manifest: dict, expect: Optional[dict]) -> _Prefix:
    vocab = int(manifest["tokenizer"]["vocab_size"])
    ix = open_index(directory, prefix, manifest, expect)
    arrays = open_doc_arrays(directory, prefix, ix)
    recorded = bool(expect and expect.get("facts"))
    if recorded:
        check_file_sizes(directory, expect)
        runs = load_runs(directory, prefix, ix.num_tokens)
    else:
        runs = _scanned(ix, vocab)
    doc_min, doc_max = facts.doc_label_range(runs, ix.offsets, ix.lengths)
    if recorded:
        _check_recorded(directory, prefix, ix, expect, vocab, runs, (doc_min, doc_max))
    return _Prefix(ix, runs, doc_max, doc_min, arrays, recorded)


def split_prefixes(manifest: dict, split: str) -> list[tuple[str, Optional[dict]]]:
    """The prefixes of ``split`` with their manifest entries: the listed shards, or the bare
    prefix ``split`` with the split's own entry (None when the manifest has none)."""
    entry = (manifest.get("splits") or {}).get(split)
    entries = (entry or {}).get("shards")
    if not entries:
        return [(split, entry if isinstance(entry, dict) else None)]
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

    def cat(arrays):
        if any(a is None for a in arrays):
            return None
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    lengths = cat([p.index.lengths for p in parts])
    sizes = [p.index.num_tokens for p in parts]
    tok_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    offsets = cat([p.index.offsets + b for p, b in zip(parts, tok_base)])
    tokens = parts[0].index.tokens if len(parts) == 1 else FlatConcat([p.index.tokens for p in parts])
    labels = parts[0].index.labels if len(parts) == 1 else FlatConcat([p.index.labels for p in parts])
    doc_max, doc_min = cat([p.doc_max for p in parts]), cat([p.doc_min for p in parts])
    span_lengths = cat([p.arrays.span_lengths for p in parts])
    if span_lengths is None and any(p.arrays.span_lengths is not None for p in parts):
        raise DataError(f"{directory}: split {split!r} has paragraph spans in some shards only")
    span_offsets = None if span_lengths is None else np.concatenate([[0], np.cumsum(span_lengths)[:-1]])
    return ShardSplit(directory=directory, split=split, manifest=manifest, doc_lengths=lengths,
                      doc_offsets=offsets, doc_labels=doc_max,
                      doc_truth=cat([p.arrays.truth for p in parts]),
                      doc_scores=cat([p.arrays.scores for p in parts]), tokens=tokens, labels=labels,
                      mixed_label_docs=int((doc_max != doc_min).sum()),
                      span_offsets=span_offsets, span_truth=cat([p.arrays.span_truth for p in parts]),
                      prefixes=tuple(p for p, _ in listed), doc_label_min=doc_min,
                      label_runs=facts.merge_runs((p.runs, n) for p, n in zip(parts, sizes)),
                      unrecorded=tuple(name for (name, _), p in zip(listed, parts) if not p.recorded))
