"""Held-out and fine-tuning sequences from a data_prep shard directory.

Documents are concatenated (EOD already appended) and cut into ``seq + 1`` token chunks;
training streams are packed per applied label or per true domain so every sequence is
label-homogeneous (DESIGN.md, "Labels, packing and batches").
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..data import DataError, open_split
from .common import Batch

SPLITS = {"forget": "test_forget", "retain": "test_retain", "adjacent": "test_adjacent"}


def tokenizer_sha256(data: Path) -> str:
    return hashlib.sha256((Path(data) / "tokenizer.model").read_bytes()).hexdigest()


def has_split(data: Path, split: str) -> bool:
    return (Path(data) / f"{split}_tokens.idx").exists()


def sequences(data: Path, split: str, seq: int, max_sequences: Optional[int] = None,
              truth: Optional[int] = None, label: Optional[int] = None) -> torch.Tensor:
    """``[n, seq + 1]`` chunks of the split's documents (optionally one true domain / applied
    label), read through the same validated reader as training."""
    shard = open_split(data, split)
    keep = np.ones(shard.num_docs, dtype=bool)
    if truth is not None:
        keep &= shard.doc_truth == truth
    if label is not None:
        keep &= shard.doc_labels == label
    docs = [shard.get_tokens(int(i)).astype(np.int64) for i in np.flatnonzero(keep)]
    total = sum(len(d) for d in docs)
    n = total // (seq + 1)
    if n == 0:
        what = f"split {split!r}" + (f" (truth {truth})" if truth is not None else "") + \
               (f" (label {label})" if label is not None else "")
        raise DataError(f"{data}: {what} has {total} tokens, fewer than one sequence of "
                        f"{seq + 1}; nothing to evaluate")
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
