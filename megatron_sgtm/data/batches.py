"""Training and held-out micro-batches from a ``ShardSplit``.

Global order: epoch ``e`` visits the packed samples in ``default_rng([seed, e]).permutation``;
epochs repeat with fresh permutations, so a filtered run (fewer samples) still takes the same
number of optimizer steps. Micro-step ``j`` consumes global positions
``[j * mbs * dp, (j + 1) * mbs * dp)`` and DP rank ``r`` takes the ``r``-th ``mbs`` of them, so
a global batch of ``accum`` micro-steps is one contiguous run of the order whatever the DP
size: DP=2 x accum=1 and DP=1 x accum=2 see the same samples per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .packing import PackedIndex, cached_packing
from .shards import DataError, ShardSplit

FORGET_LABEL, ADJACENT_TRUTH = 2, 2


@dataclass(frozen=True)
class MethodSpec:
    """How a training method uses the labels."""

    routes: bool  # the model routes by the sample's label; otherwise routing labels are 0
    drop_labels: tuple[int, ...] = ()  # applied labels whose documents are removed
    drop_truth: tuple[int, ...] = ()  # true domains whose documents are removed


# Add new methods here; the loop's routing config names the model-side behaviour.
METHODS: dict[str, MethodSpec] = {
    "none": MethodSpec(routes=False),
    "sgtm": MethodSpec(routes=True),
    "gradient_routing": MethodSpec(routes=True),
    "activation_masking": MethodSpec(routes=True),
    "weak_filter": MethodSpec(routes=False, drop_labels=(FORGET_LABEL,)),
    # The paper's strict filter also removes the adjacent categories, which truth records.
    "strict_filter": MethodSpec(routes=False, drop_labels=(FORGET_LABEL,),
                                drop_truth=(ADJACENT_TRUTH,)),
    # These read applied_label themselves (loss masking / control tokens).
    "slung": MethodSpec(routes=False),
    "conditional": MethodSpec(routes=False),
}


def method_spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise DataError(f"unknown data method {method!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def _gather(split: ShardSplit, index: PackedIndex, samples: np.ndarray) -> dict:
    """Token, per-token label and per-token truth rows [b, seq+1] for ``samples``."""
    lo, hi = index.piece_ptr[samples], index.piece_ptr[samples + 1]
    pieces = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
    docs = index.piece_doc[pieces]
    lens = index.piece_stop[pieces] - index.piece_start[pieces]
    starts = split.doc_offsets[docs] + index.piece_start[pieces]
    # Flat positions of every token: each piece contributes start, start+1, ..., start+len-1.
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    pos = shift + np.arange(int(lens.sum()))
    rows = (len(samples), index.seq_length + 1)
    truth = (split.truth_at(pos) if split.span_offsets is not None
             else np.repeat(split.doc_truth[docs], lens))
    return {"tokens": split.tokens[pos].astype(np.int64).reshape(rows),
            "labels": split.labels[pos].astype(np.int64).reshape(rows),
            "truth": truth.reshape(rows)}


def _to_batch(rows: dict, routing: np.ndarray, sample_label: np.ndarray,
              sample_truth: np.ndarray) -> dict:
    s = rows["tokens"].shape[1] - 1
    t = torch.from_numpy
    return {
        "tokens": t(np.ascontiguousarray(rows["tokens"][:, :-1])),
        "targets": t(np.ascontiguousarray(rows["tokens"][:, 1:])),
        "routing_labels": t(np.repeat(routing[:, None], s, axis=1)),
        # Per target position: the sidecar's applied label and the document's true domain
        # (SLUNG flags targets by it; the counters count tokens true -> applied).
        "applied_label": t(np.ascontiguousarray(rows["labels"][:, 1:])),
        "true_domain": t(np.ascontiguousarray(rows["truth"][:, 1:])),
        "sample_label": t(sample_label.astype(np.int64)),
        "sample_truth": t(sample_truth.astype(np.int64)),
    }


class TrainBatches:
    """Infinite label-homogeneous micro-batches for one DP rank, resumable exactly."""

    def __init__(self, split: ShardSplit, seq_length: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, method: str,
                 consumed_samples: int = 0, cache_dir: Optional[Path] = None,
                 use_cache: bool = True) -> None:
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise DataError(f"bad batch geometry: micro_batch_size {micro_batch_size}, "
                            f"dp_rank {dp_rank}, dp_size {dp_size}")
        self.spec = method_spec(method)
        self.split = split
        split.expect_random_reads()
        self.seq_length, self.mbs = seq_length, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.method = dp_rank, dp_size, seed, method
        if cache_dir is None and use_cache:
            cache_dir = Path(split.directory) / ".packing_cache"
        # Documents with several labels (paragraph labels) are packed as label runs, so every
        # sequence stays label-homogeneous (packing.py).
        units = split.units()
        lengths, labels, truth = ((split.doc_lengths, split.doc_labels, split.doc_truth)
                                  if units is None else (units[2], units[3], units[4]))
        self.index, self.key = cached_packing(
            cache_dir if use_cache else None, lengths, labels, truth, seq_length, seed,
            self.spec.drop_labels, self.spec.drop_truth, self.spec.routes,
            None if units is None else units[:2])
        if self.index.num_samples == 0:
            raise DataError(f"{split.directory}: split {split.split!r} packs into no samples of "
                            f"{seq_length + 1} tokens with method {method!r} "
                            f"({split.num_tokens} tokens, {self.index.dropped_docs} documents "
                            "filtered)")
        self.consumed_samples = int(consumed_samples)
        self._perm_epoch, self._perm = -1, None

    @property
    def num_samples(self) -> int:
        return self.index.num_samples

    def _order(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at global positions (positions lie in at most two epochs)."""
        n = self.num_samples
        out = np.empty(len(positions), np.int64)
        epochs = positions // n
        for e in np.unique(epochs):
            if e != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, int(e)]).permutation(n)
                self._perm_epoch = int(e)
            sel = epochs == e
            out[sel] = self._perm[positions[sel] % n]
        return out

    def global_samples(self, start: int, count: int) -> np.ndarray:
        """Sample ids at global positions ``[start, start + count)`` (all ranks)."""
        return self._order(np.arange(start, start + count, dtype=np.int64))

    def batch_at(self, consumed: int) -> dict:
        """This rank's micro-batch for the micro-step that starts at global position ``consumed``."""
        start = consumed + self.dp_rank * self.mbs
        samples = self.global_samples(start, self.mbs)
        # Sequences ordered by routing label (forget, retain, unlabeled), so each label is one
        # contiguous range of the batch dimension for the per-sequence masking path
        # (seq_masking.py). The order inside a micro-batch changes no result: the loss is a
        # mean over its tokens and attention stays inside a sequence.
        order = np.argsort(-self.index.routing_label[samples], kind="stable")
        samples = samples[order]
        rows = _gather(self.split, self.index, samples)
        batch = _to_batch(rows, self.index.routing_label[samples],
                          self.index.sample_label[samples], self.index.sample_truth[samples])
        # Each sequence's global position in the data order: keys its dropout masks, the same
        # at every DP size (megatron_sgtm/dropout.py).
        batch["sample_position"] = torch.from_numpy(np.arange(start, start + self.mbs)[order])
        return batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch = self.batch_at(self.consumed_samples)
            self.consumed_samples += self.mbs * self.dp_size
            yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "method": self.method, "seq_length": self.seq_length, "index_key": self.key,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``consumed_samples``; refuse when the data or packing changed under it."""
        for name in ("seed", "method", "seq_length", "index_key"):
            if name in state and state[name] != getattr(self, "key" if name == "index_key"
                                                        else name):
                raise DataError(f"data position was saved for a different {name} "
                                f"({state[name]!r}, now {getattr(self, 'key' if name == 'index_key' else name)!r}); "
                                "the run cannot resume at the same samples")
        self.consumed_samples = int(state["consumed_samples"])


class EvalBatches:
    """Held-out micro-batches: documents in file order, cut into ``seq + 1`` token rows.

    Finite and deterministic; no label grouping (held-out splits are single-domain). With
    ``dp_size > 1`` rank ``r`` takes every ``dp_size``-th micro-batch.
    """

    def __init__(self, split: ShardSplit, seq_length: int, micro_batch_size: int,
                 max_samples: Optional[int] = None, dp_rank: int = 0, dp_size: int = 1) -> None:
        self.split, self.seq_length, self.mbs = split, seq_length, micro_batch_size
        n = split.num_tokens // (seq_length + 1)
        if max_samples is not None:
            n = min(n, int(max_samples))
        if n == 0:
            raise DataError(f"{split.directory}: split {split.split!r} has {split.num_tokens} "
                            f"tokens, fewer than one sample of {seq_length + 1}")
        self.num_samples = n
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __len__(self) -> int:
        batches = -(-self.num_samples // self.mbs)
        return len(range(self.dp_rank, batches, self.dp_size))

    def __iter__(self) -> Iterator[dict]:
        width = self.seq_length + 1
        for start in range(self.dp_rank * self.mbs, self.num_samples, self.mbs * self.dp_size):
            stop = min(start + self.mbs, self.num_samples)
            flat = slice(start * width, stop * width)
            tokens = np.asarray(self.split.tokens[flat], np.int64).reshape(-1, width)
            labels = np.asarray(self.split.labels[flat], np.int64).reshape(-1, width)
            doc = np.searchsorted(self.split.doc_offsets, np.arange(flat.start, flat.stop),
                                  side="right") - 1
            truth = self.split.doc_truth[doc].reshape(-1, width)
            rows = {"tokens": tokens, "labels": labels, "truth": truth}
            majority = np.stack([(truth == k).sum(axis=1) for k in range(3)], 1).argmax(1)
            yield _to_batch(rows, np.zeros(len(tokens), np.int64), labels.max(axis=1), majority)
