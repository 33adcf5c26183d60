"""Score and tokenize one chunk of documents: the work every map task repeats.

Document granularity: one score per document, tokens = ``encode(text) + [eod]``.

Paragraph granularity: the document is scored as a whole, and so is every paragraph of at
least ``classifier.min_paragraph_chars`` characters; shorter paragraphs take the
document's score. Tokens are ``encode(p1) + encode(p2) + ... + [eod]``: each paragraph is
encoded on its own so that every token belongs to exactly one paragraph (sentencepiece
normalises the blank line between paragraphs to a word boundary anyway). Each paragraph
is a *span*; the end-of-document token belongs to the last span. A paragraph that encodes
to no tokens is merged into nothing (it has no tokens to label).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_prep.classifiers import Scorer, oracle_scores, stage_counts
from data_prep.documents import Doc
from data_prep.recipe import ClassifierConfig


@dataclass
class Encoded:
    tokens: np.ndarray  # token dtype, all documents concatenated
    doc_lengths: np.ndarray  # int64
    doc_truth: np.ndarray  # uint8
    doc_scores: np.ndarray  # float32
    span_lengths: Optional[np.ndarray] = None  # int64, tiling each document in order
    span_truth: Optional[np.ndarray] = None  # uint8
    span_scores: Optional[np.ndarray] = None  # float32
    span_docs: Optional[np.ndarray] = None  # int64 spans per document
    # Cascades: per level (document, paragraph), per stage, what it saw and decided.
    stage_counts: Optional[dict] = None


class ChunkEncoder:
    """Holds the tokenizer and the scorer of one process. Encoding is single-threaded:
    parallelism is one process per shard (``--workers``, array tasks), and sentencepiece's
    default of a thread per hardware core would oversubscribe every worker's CPUs."""

    def __init__(self, model_bytes: bytes, eod_id: int, dtype, cfg: ClassifierConfig,
                 scorer: Optional[Scorer]) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.eod, self.dtype, self.cfg = int(eod_id), np.dtype(dtype).type, cfg
        self.scorer = scorer  # None = oracle: the truth itself

    def _score(self, texts: list[str], truth: np.ndarray, level: str, counts: dict) -> np.ndarray:
        if self.scorer is None:
            return oracle_scores(truth)
        trace = self.scorer.trace(texts)
        per_stage = stage_counts(trace, truth, self.cfg.stages)
        if per_stage is not None:
            counts[level] = per_stage
        return trace.scores

    def _flat(self, ids: list[list[int]], lengths: np.ndarray) -> np.ndarray:
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))

    def encode(self, docs: list[Doc], paragraphs: bool = False) -> Encoded:
        truth = np.fromiter((d.truth for d in docs), np.uint8, count=len(docs))
        counts: dict = {}
        scores = self._score([d.text for d in docs], truth, "document", counts)
        if not paragraphs:
            ids = self.sp.encode([d.text for d in docs], num_threads=1)
            for x in ids:
                x.append(self.eod)
            lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
            enc = Encoded(self._flat(ids, lengths), lengths, truth, scores)
        else:
            enc = self._encode_paragraphs(docs, truth, scores, counts)
        enc.stage_counts = counts or None
        return enc

    def _encode_paragraphs(self, docs: list[Doc], truth: np.ndarray, scores: np.ndarray,
                           counts: dict) -> Encoded:
        paras = [p for d in docs for p in d.paragraphs]
        owner = np.repeat(np.arange(len(docs)), [len(d.paragraphs) for d in docs])
        ptruth = np.fromiter(
            (t for d in docs for t in (d.paragraph_truth or [d.truth] * len(d.paragraphs))),
            np.uint8, count=len(paras))
        long_ = np.fromiter((len(p) >= self.cfg.min_paragraph_chars for p in paras), bool,
                            count=len(paras))
        pscores = scores[owner].copy()
        if long_.any():
            idx = np.flatnonzero(long_)
            pscores[idx] = self._score([paras[i] for i in idx], ptruth[idx], "paragraph", counts)
        ids = self.sp.encode(paras, num_threads=1)
        plen = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
        # The end-of-document token goes with each document's last paragraph.
        last = np.cumsum([len(d.paragraphs) for d in docs]) - 1
        for i in last:
            ids[i].append(self.eod)
        plen[last] += 1
        keep = plen > 0
        doc_lengths = np.bincount(owner, weights=plen, minlength=len(docs)).astype(np.int64)
        span_docs = np.bincount(owner[keep], minlength=len(docs)).astype(np.int64)
        return Encoded(self._flat(ids, plen), doc_lengths, truth, scores,
                       plen[keep], ptruth[keep], pscores[keep].astype(np.float32), span_docs)
