"""Shard files: names, writing, reading back, and atomic placement into the output directory.

Layout of an output directory ``DIR``::

    manifest.json                      written last; lists every train shard
    tokenizer.model
    test_{retain,forget,adjacent}_*    held-out splits, one prefix each (small: drawn from the sample)
    train/shard-NNNNN_*                one prefix per map task
    .prep/                             plan, held-out/seed ids, classifier, completion markers

Per prefix ``P``: ``P_tokens.bin/.idx`` (one IndexedDataset entry per document, ending in
the end-of-document id), ``P_labels.bin/.idx`` (uint8 applied label per token, same entry
lengths), ``P_truth.npy`` (uint8 true domain per document), ``P_scores.npy`` (float32
forget score per document); paragraph granularity adds ``P_span_lengths.npy`` (int32
tokens per paragraph span, tiling each document), ``P_span_truth.npy`` and
``P_span_scores.npy``; the topic classifier adds ``P_seed.npy`` (1 = used to fit it).

Documents are deliberately *not* packed into fixed-length sequences here: training packs
label-homogeneous sequences at load time, so a relabel only rewrites the small label sidecar.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.errors import PrepError
from data_prep.indexed import IndexedWriter, read_lengths
from megatron_sgtm.data import facts

TEST_SPLITS = ("test_retain", "test_forget", "test_adjacent")
STATE = ".prep"
TRAIN_DIR = "train"
DOC_ARRAYS = ("truth", "scores", "seed", "span_lengths", "span_truth", "span_scores")


def shard_prefix(index: int) -> str:
    return f"{TRAIN_DIR}/shard-{index:05d}"


def marker_path(out: Path, index: int) -> Path:
    return Path(out) / STATE / f"shard-{index:05d}.done.json"


def indexed_files(prefix: str, kind: str) -> list[str]:
    return [f"{prefix}_{kind}.bin", f"{prefix}_{kind}.idx"]


def write_tokens(directory: Path, prefix: str, flat: np.ndarray, lengths: np.ndarray, dtype) -> None:
    w = IndexedWriter(Path(directory) / f"{prefix}_tokens", dtype)
    w.add(flat, lengths)
    w.finalize()


def write_labels(directory: Path, prefix: str, unit_labels: np.ndarray, unit_lengths: np.ndarray,
                 doc_lengths: np.ndarray) -> np.ndarray:
    """Per-token labels: each unit (document or span) repeats its label over its tokens.
    Returns their run file's rows (``megatron_sgtm.data.facts``), from the array in memory."""
    flat = np.repeat(np.asarray(unit_labels, np.uint8), np.asarray(unit_lengths, np.int64))
    w = IndexedWriter(Path(directory) / f"{prefix}_labels", np.uint8)
    w.add(flat, doc_lengths)
    w.finalize()
    return facts.label_runs(flat)


def label_files(prefix: str) -> list[str]:
    """The label sidecar of a prefix: what a relabel rewrites."""
    return indexed_files(prefix, "labels") + [facts.runs_name(prefix)]


def scan_facts(directory: Path, prefix: str, token_dtype) -> tuple[dict, np.ndarray]:
    """(facts, label runs) of a prefix on disk, by reading all of its tokens and labels."""
    lengths = doc_lengths(directory, prefix)
    tokens = np.memmap(Path(directory) / f"{prefix}_tokens.bin", dtype=np.dtype(token_dtype), mode="r")
    labels = np.memmap(Path(directory) / f"{prefix}_labels.bin", dtype=np.uint8, mode="r")
    return facts.scan_prefix(tokens, labels, facts.doc_offsets(lengths), lengths)


def save_array(directory: Path, prefix: str, kind: str, arr: np.ndarray) -> str:
    # np.save output depends only on dtype, shape and data: byte-identical on re-runs.
    name = f"{prefix}_{kind}.npy"
    np.save(Path(directory) / name, arr, allow_pickle=False)
    return name


def load_array(directory: Path, prefix: str, kind: str, required: bool = True):
    path = Path(directory) / f"{prefix}_{kind}.npy"
    if not path.is_file():
        if required:
            raise PrepError(f"{path}: missing")
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PrepError(f"{path}: unreadable ({e})") from None


def doc_lengths(directory: Path, prefix: str) -> np.ndarray:
    """Entry lengths of a token file, read from its .idx without loading tokens."""
    path = Path(directory) / f"{prefix}_tokens"
    try:
        lengths, _ = read_lengths(path)
    except (OSError, ValueError) as e:
        raise PrepError(f"{path}.idx: unreadable ({e})") from None
    return np.asarray(lengths, dtype=np.int64)


def read_split(directory: Path, prefix: str) -> dict:
    """Open one prefix through megatron-core's reader and check the sidecars agree."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    directory = Path(directory)
    tokens = IndexedDataset(str(directory / f"{prefix}_tokens"), mmap=True)
    labels = IndexedDataset(str(directory / f"{prefix}_labels"), mmap=True)
    truth = np.load(directory / f"{prefix}_truth.npy")
    scores = np.load(directory / f"{prefix}_scores.npy")
    if not np.array_equal(tokens.sequence_lengths, labels.sequence_lengths):
        raise PrepError(f"{directory}: {prefix} label sidecar does not match the token file's documents")
    if not len(tokens) == len(truth) == len(scores):
        raise PrepError(f"{directory}: {prefix} truth/scores have {len(truth)}/{len(scores)} "
                        f"entries for {len(tokens)} documents")
    return {"tokens": tokens, "labels": labels, "truth": truth, "scores": scores}


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def file_record(directory: Path, name: str) -> dict:
    p = Path(directory) / name
    return {"bytes": p.stat().st_size, "sha256": sha256_files([p])}


@contextlib.contextmanager
def staging(out: Path, tag: str = "staging") -> Iterator[Path]:
    """A scratch directory under ``out/.prep`` (same filesystem, so os.replace is atomic);
    removed afterwards whether or not the step succeeded."""
    state = Path(out) / STATE
    state.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"tmp-{tag}-", dir=state))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clear_stale_staging(out: Path, tag: str) -> None:
    """Scratch left by a killed run of the same step."""
    state = Path(out) / STATE
    if state.is_dir():
        for p in state.glob(f"tmp-{tag}-*"):
            shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp: Path, out: Path, names: list[str]) -> None:
    """Move staged files (relative names, sub-folders allowed) into ``out``."""
    for name in names:
        dest = Path(out) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fsync(tmp / name)
        os.replace(tmp / name, dest)


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, sort_keys=True, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_manifest(out: Path) -> None:
    """First act of any step that changes files: a directory without manifest is never taken
    as a complete corpus."""
    with contextlib.suppress(FileNotFoundError):
        (Path(out) / "manifest.json").unlink()
