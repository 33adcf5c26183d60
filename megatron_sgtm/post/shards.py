"""Held-out and fine-tuning sequences from a data_prep shard directory.

Documents are concatenated (EOD already appended) and cut into ``seq + 1`` token chunks;
training streams are packed per applied label or per true domain so every sequence is
label-homogeneous (DESIGN.md, "Labels, packing and batches").
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .common import Batch

SPLITS = {"forget": "test_forget", "retain": "test_retain", "adjacent": "test_adjacent"}


class ShardError(ValueError):
    """A shard directory or split that cannot serve the request."""


def read_manifest(data: Path) -> dict:
    path = Path(data) / "manifest.json"
    if not path.exists():
        raise ShardError(f"{data}: no manifest.json (not a finished `sgtm prep` output)")
    return json.loads(path.read_text())


def tokenizer_sha256(data: Path) -> str:
    return hashlib.sha256((Path(data) / "tokenizer.model").read_bytes()).hexdigest()


def has_split(data: Path, split: str) -> bool:
    return (Path(data) / f"{split}_tokens.idx").exists()


def _documents(data: Path, split: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = Path(data) / f"{split}_tokens"
    if not prefix.with_suffix(".idx").exists():
        raise ShardError(f"{data}: split {split!r} is missing ({prefix}.idx)")
    if prefix.with_suffix(".bin").stat().st_size == 0:
        return [], [], np.zeros(0, np.uint8)  # megatron cannot mmap an empty file
    tokens = IndexedDataset(str(prefix))
    labels = IndexedDataset(str(Path(data) / f"{split}_labels"))
    truth_path = Path(data) / f"{split}_truth.npy"
    truth = np.load(truth_path) if truth_path.exists() else np.zeros(len(tokens), np.uint8)
    return tokens, labels, truth


def sequences(data: Path, split: str, seq: int, max_sequences: Optional[int] = None,
              truth: Optional[int] = None, label: Optional[int] = None) -> torch.Tensor:
    """``[n, seq + 1]`` chunks of the split's documents (optionally one true domain / label)."""
    tokens, labels, truths = _documents(data, split)
    docs = [np.asarray(tokens[i], dtype=np.int64) for i in range(len(tokens))
            if (truth is None or int(truths[i]) == truth)
            and (label is None or int(labels[i][0]) == label)]
    n = sum(len(d) for d in docs) // (seq + 1)
    if n == 0:
        what = f"split {split!r}" + (f" (truth {truth})" if truth is not None else "") + \
               (f" (label {label})" if label is not None else "")
        raise ShardError(f"{data}: {what} has {sum(len(d) for d in docs)} tokens, fewer than one "
                         f"sequence of {seq + 1}; nothing to evaluate")
    flat = np.concatenate(docs)[: n * (seq + 1)]
    out = torch.from_numpy(flat.reshape(n, seq + 1))
    if max_sequences is not None and n > max_sequences:
        out = out[:max_sequences]
    return out


def to_batches(seqs: torch.Tensor, batch_size: int, device=None) -> list[Batch]:
    out = []
    for chunk in seqs.split(batch_size):
        chunk = chunk.to(device) if device is not None else chunk
        out.append(Batch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()))
    return out


def stream(seqs: torch.Tensor, batch_size: int, seed: int, device=None) -> Iterator[Batch]:
    """Endless random batches (same on every TP rank: same seed)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        chunk = seqs[torch.randint(0, len(seqs), (batch_size,), generator=gen)]
        chunk = chunk.to(device) if device is not None else chunk
        yield Batch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())


def eval_sets(data: Path, seq: int, batch_size: int, max_sequences: Optional[int],
              device=None) -> dict[str, list[Batch]]:
    """forget / retain (/ adjacent when present) held-out batches."""
    out = {}
    for name, split in SPLITS.items():
        if name == "adjacent" and not has_split(data, split):
            continue
        out[name] = to_batches(sequences(data, split, seq, max_sequences), batch_size, device)
    return out
