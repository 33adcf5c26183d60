"""Micro-batches for training and evaluation, deterministic and resumable.

Global order: samples in a seeded permutation per epoch; global micro-batch ``m`` is
positions ``[m * B * dp, (m + 1) * B * dp)`` and data-parallel rank ``r`` takes its slice
``[r * B, (r + 1) * B)``. So DP=2 with one micro-batch per step sees exactly the samples of
DP=1 with two accumulated micro-batches, and the position (``consumed_samples``) is the only
state an exact resume needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import SampleIndex, build_sample_index, global_sample
from .shards import DataError, ShardSplit

TRUTH_ADJACENT = 2


@dataclass(frozen=True)
class MethodData:
    """How a training method uses the labels (SGTM.md sections 3 and 6)."""

    drop_forget: bool = False       # weak filter: forget-labelled documents are not trained on
    drop_adjacent: bool = False     # strict filter: nor the adjacent category
    route: bool = False             # labels go to the routing context
    report_labels: bool = False     # labels are applied (routing, SLUNG masks, control tokens)


METHODS = {
    "none": MethodData(),
    "sgtm": MethodData(route=True, report_labels=True),
    "gradient_routing": MethodData(route=True, report_labels=True),
    "activation_masking": MethodData(route=True, report_labels=True),
    "weak_filter": MethodData(drop_forget=True),
    "strict_filter": MethodData(drop_forget=True, drop_adjacent=True),
    "slung": MethodData(report_labels=True),
    "conditional": MethodData(report_labels=True),
}


def kept_documents(split: ShardSplit, method: str) -> np.ndarray:
    rule = METHODS[method]
    keep = np.ones(len(split), dtype=bool)
    if rule.drop_forget:
        keep &= split.doc_labels != 2
    if rule.drop_adjacent:
        keep &= split.doc_truth != TRUTH_ADJACENT
    return keep


class TrainBatches:
    """Iterator of micro-batch dicts of int64 tensors ``[B, seq]``:
    ``tokens``, ``targets``, ``routing_labels`` (0 unless the method routes), ``applied_label``
    (the label the method applied to each token) and ``true_domain`` (per token)."""

    def __init__(self, split: ShardSplit, seq_length: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, method: str, consumed_samples: int = 0):
        if method not in METHODS:
            raise DataError(f"unknown data method {method!r}; known: {', '.join(METHODS)}")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} outside data-parallel size {dp_size}")
        self.split, self.method = split, METHODS[method]
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_samples = consumed_samples
        keep = kept_documents(split, method)
        try:
            self.index: SampleIndex = build_sample_index(split.doc_lengths, split.doc_labels,
                                                         keep, seq_length, seed)
        except ValueError as exc:
            raise DataError(f"{split.directory} ({split.split}, method {method}): {exc}") from None
        self._order_cache: dict = {}

    def __len__(self) -> int:
        """Samples per epoch."""
        return len(self.index)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "num_samples": len(self.index)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples", len(self.index)) != len(self.index):
            raise DataError(f"the data changed since the checkpoint: {state['num_samples']} "
                            f"samples then, {len(self.index)} now")
        self.consumed_samples = int(state["consumed_samples"])

    def __iter__(self):
        return self

    def _sample(self, sample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        split = self.split
        tokens, labels, truth = [], [], []
        for doc, start, stop in self.index.pieces(sample):
            base = int(split.doc_offsets[doc])
            tokens.append(split.tokens[base + start:base + stop])
            labels.append(split.token_labels[base + start:base + stop])
            truth.append(np.full(stop - start, split.doc_truth[doc], dtype=np.int64))
        return (np.concatenate(tokens).astype(np.int64), np.concatenate(labels).astype(np.int64),
                np.concatenate(truth))

    def __next__(self) -> dict:
        b = self.micro_batch_size
        first = self.consumed_samples + self.dp_rank * b
        rows = [self._sample(global_sample(first + i, len(self.index), self.seed,
                                           self._order_cache)) for i in range(b)]
        self.consumed_samples += b * self.dp_size
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))[:, :-1]
        truth = torch.from_numpy(np.stack([r[2] for r in rows]))[:, :-1]
        applied = labels if self.method.report_labels else torch.zeros_like(labels)
        return {
            "tokens": tokens[:, :-1].contiguous(),
            "targets": tokens[:, 1:].contiguous(),
            "routing_labels": (labels if self.method.route else torch.zeros_like(labels)).contiguous(),
            "applied_label": applied.contiguous(),
            "true_domain": truth.contiguous(),
        }
