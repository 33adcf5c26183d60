"""Shard files: writing, reading back, and atomic placement into the output directory.

Layout per split ``S``: ``S_tokens.bin/.idx`` (one IndexedDataset entry per document,
ending in the end-of-document id), ``S_labels.bin/.idx`` (uint8 applied label per token,
same entry lengths), ``S_truth.npy`` (uint8 true domain per document) and
``S_scores.npy`` (float32 forget-score per document).

Documents are deliberately *not* packed into fixed-length sequences here. The training
side packs label-homogeneous sequences at load time from the document lengths and
labels, so a relabel only rewrites the small label sidecar and never the tokens, and
forget-labelled text never shares a sequence with retain-labelled text.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.errors import PrepError

SPLITS = ("train", "test_retain", "test_forget", "test_adjacent")


def split_files(split: str) -> list[str]:
    return [f"{split}_{kind}.{ext}" for kind in ("tokens", "labels") for ext in ("bin", "idx")] + \
        [f"{split}_truth.npy", f"{split}_scores.npy"]


def all_known_files() -> list[str]:
    """Every file name prep may write (used to clear a directory under --force)."""
    return ["tokenizer.model", "manifest.json", "train_classifier_seed.npy"] + \
        [f for s in SPLITS for f in split_files(s)]


def _indexed_dataset_module():
    # megatron.core warns about missing fused training kernels on import; prep only does
    # file I/O, so those warnings would be noise on every `sgtm prep`.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _write_indexed(prefix: Path, flat: np.ndarray, lengths: np.ndarray, dtype: type) -> None:
    IndexedDatasetBuilder = _indexed_dataset_module().IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for a, b in zip(bounds[:-1], bounds[1:]):
        builder.add_document(flat[a:b], [int(b - a)])
    builder.finalize(str(prefix) + ".idx")


def write_tokens(directory: Path, split: str, flat: np.ndarray, lengths: np.ndarray, dtype: type) -> None:
    _write_indexed(directory / f"{split}_tokens", flat.astype(dtype, copy=False), lengths, dtype)


def write_labels(directory: Path, split: str, doc_labels: np.ndarray, lengths: np.ndarray) -> None:
    flat = np.repeat(doc_labels.astype(np.uint8), lengths)
    _write_indexed(directory / f"{split}_labels", flat, lengths, np.uint8)


def write_doc_arrays(directory: Path, split: str, truth: np.ndarray, scores: np.ndarray) -> None:
    # np.save output depends only on dtype, shape and data: byte-identical on re-runs.
    np.save(directory / f"{split}_truth.npy", truth.astype(np.uint8), allow_pickle=False)
    np.save(directory / f"{split}_scores.npy", scores.astype(np.float32), allow_pickle=False)


def doc_lengths(directory: Path, split: str) -> np.ndarray:
    """Entry lengths of a token shard, read from its .idx without loading tokens."""
    ds = _indexed_dataset_module().IndexedDataset(str(directory / f"{split}_tokens"), mmap=True)
    return np.asarray(ds.sequence_lengths, dtype=np.int64).copy()


def read_split(directory: Path, split: str) -> dict:
    """Open one split and check that the sidecars agree with the token file."""
    IndexedDataset = _indexed_dataset_module().IndexedDataset
    directory = Path(directory)
    tokens = IndexedDataset(str(directory / f"{split}_tokens"), mmap=True)
    labels = IndexedDataset(str(directory / f"{split}_labels"), mmap=True)
    truth = np.load(directory / f"{split}_truth.npy")
    scores = np.load(directory / f"{split}_scores.npy")
    if not np.array_equal(tokens.sequence_lengths, labels.sequence_lengths):
        raise PrepError(f"{directory}: {split} label sidecar does not match the token file's documents")
    if not len(tokens) == len(truth) == len(scores):
        raise PrepError(f"{directory}: {split} truth/scores have {len(truth)}/{len(scores)} "
                        f"entries for {len(tokens)} documents")
    return {"tokens": tokens, "labels": labels, "truth": truth, "scores": scores}


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A scratch directory inside ``out`` (same filesystem, so os.replace is atomic);
    removed afterwards whether or not the run succeeded."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path, names: list[str], remove: list[str] = ()) -> None:
    """Move staged files into ``out``; ``manifest.json`` goes last.

    The old manifest is removed first, so a crash half-way leaves a directory without
    manifest, which is never taken as a complete corpus.
    """
    manifest = out / "manifest.json"
    if manifest.exists():
        manifest.unlink()
    for name in remove:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for name in names:
        if name != "manifest.json":
            os.replace(tmp / name, out / name)
    if "manifest.json" in names:
        fd = os.open(tmp / "manifest.json", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp / "manifest.json", manifest)
