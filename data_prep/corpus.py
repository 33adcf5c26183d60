"""A whole (small) corpus in memory: every document of every shard, with its truth.

Prep itself never holds the corpus (see data_prep.pipeline); this reads the same shards
through the same validation for tools and tests that want the documents as one list.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from data_prep.documents import ADJACENT, DOMAIN_NAMES, FORGET, RETAIN, DocCounts, shard_docs
from data_prep.plan import make_plan
from data_prep.recipe import Recipe
from data_prep.sample import compute_caps

__all__ = ["ADJACENT", "DOMAIN_NAMES", "FORGET", "RETAIN", "Corpus", "load_corpus"]


@dataclass
class Corpus:
    texts: list[str]
    truth: np.ndarray  # uint8 per document
    input_sha256: dict[str, str] = field(default_factory=dict)  # shard input -> sha256
    counts: DocCounts = field(default_factory=DocCounts)

    @property
    def skipped_empty(self) -> int:
        return self.counts.skipped_empty

    @property
    def uncategorized_docs(self) -> int:
        return self.counts.uncategorized

    @property
    def dropped_docs(self) -> int:
        return self.counts.dropped


def load_corpus(recipe: Recipe) -> Corpus:
    plan = make_plan(recipe)
    caps = compute_caps(recipe, plan)
    texts, truth, shas, counts = [], [], {}, DocCounts()
    for s in plan:
        digest = hashlib.sha256()
        for doc in shard_docs(s, recipe, caps.for_shard(s.index), counts, digest):
            texts.append(doc.text)
            truth.append(doc.truth)
        shas[s.describe(recipe)] = digest.hexdigest()
    return Corpus(texts, np.asarray(truth, np.uint8), shas, counts)
