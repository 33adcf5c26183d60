"""Pure index math: label-homogeneous training samples from documents.

Documents of one applied label are concatenated, in a seeded order, into one stream per label;
each stream is cut into samples of ``seq_length + 1`` tokens (inputs ``[:-1]``, targets
``[1:]``; consecutive samples share one boundary token, as megatron's GPTDataset). A sample
therefore never mixes labels, so causal attention cannot carry a forget document's content into
a retain-routed position (SGTM.md section 3). The stream tail shorter than a sample is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleIndex:
    """Samples as (group, start) into per-label document streams."""

    seq_length: int
    group_labels: np.ndarray        # [G] applied label of each stream
    group_docs: list                # [G] arrays: document ids in stream order
    group_starts: list              # [G] arrays: stream offset of each of those documents
    sample_group: np.ndarray        # [N] stream of each sample
    sample_start: np.ndarray        # [N] stream offset of each sample's first token

    def __len__(self) -> int:
        return len(self.sample_group)

    def sample_label(self, sample: int) -> int:
        return int(self.group_labels[self.sample_group[sample]])

    def pieces(self, sample: int) -> list[tuple[int, int, int]]:
        """``(doc, start, stop)`` slices that make up ``sample``, in order."""
        group = int(self.sample_group[sample])
        begin = int(self.sample_start[sample])
        end = begin + self.seq_length + 1
        starts, docs = self.group_starts[group], self.group_docs[group]
        first = int(np.searchsorted(starts, begin, side="right")) - 1
        out = []
        i = first
        while begin < end:
            doc_start = int(starts[i])
            doc_end = int(starts[i + 1]) if i + 1 < len(starts) else None
            stop = end if doc_end is None else min(end, doc_end)
            out.append((int(docs[i]), begin - doc_start, stop - doc_start))
            begin = stop
            i += 1
        return out


def build_sample_index(doc_lengths: np.ndarray, doc_labels: np.ndarray, keep: np.ndarray,
                       seq_length: int, seed: int) -> SampleIndex:
    """Label-homogeneous samples over the kept documents, deterministic from ``seed``."""
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    rng = np.random.default_rng(seed)
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    doc_labels = np.asarray(doc_labels, dtype=np.int64)
    labels, docs_per, starts_per, sample_group, sample_start = [], [], [], [], []
    for label in np.unique(doc_labels[keep]):
        docs = np.flatnonzero(keep & (doc_labels == label) & (doc_lengths > 0))
        docs = docs[rng.permutation(len(docs))]
        lengths = doc_lengths[docs]
        total = int(lengths.sum())
        count = (total - 1) // seq_length if total > seq_length else 0
        if count == 0:
            continue
        group = len(labels)
        labels.append(int(label))
        docs_per.append(docs)
        starts_per.append(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
        sample_group.append(np.full(count, group, dtype=np.int32))
        sample_start.append(np.arange(count, dtype=np.int64) * seq_length)
    if not labels:
        raise ValueError(f"no complete sample of {seq_length + 1} tokens in the selected "
                         "documents")
    return SampleIndex(seq_length, np.array(labels, np.int64), docs_per, starts_per,
                       np.concatenate(sample_group), np.concatenate(sample_start))


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one pass; each epoch gets its own seeded permutation."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def global_sample(position: int, num_samples: int, seed: int, cache: dict) -> int:
    """The sample at global position ``position`` (epochs repeat with new permutations)."""
    epoch, offset = divmod(position, num_samples)
    if cache.get("epoch") != epoch:
        cache["epoch"], cache["order"] = epoch, epoch_order(num_samples, seed, epoch)
    return int(cache["order"][offset])
