"""One shard's records -> validated documents with ground truth (and paragraphs).

Truth codes (also written as ``*_truth.npy``): 0 = retain, 1 = forget, 2 = adjacent.

Paragraph granularity splits a document at every run of blank lines (lines holding only
whitespace); whitespace-only paragraphs are dropped. With a source's
``paragraph_domains_field`` every paragraph carries its own truth (at either granularity),
and the document's truth is then forget if any paragraph is forget, else adjacent if any is
adjacent, else retain.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from data_prep.errors import PrepError
from data_prep.plan import ShardSpec, shard_records
from data_prep.recipe import Recipe, SourceConfig

RETAIN, FORGET, ADJACENT = 0, 1, 2
DOMAIN_NAMES = ("retain", "forget", "adjacent")
_BLANK_LINE = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


@dataclass
class Doc:
    text: str
    truth: int
    paragraphs: Optional[list[str]] = None  # paragraph granularity only
    paragraph_truth: Optional[list[int]] = None

    @property
    def pure(self) -> bool:
        """All paragraphs share the document's truth (held-out documents must be pure)."""
        return self.paragraph_truth is None or len(set(self.paragraph_truth)) <= 1


@dataclass
class DocCounts:
    uncategorized: int = 0
    dropped: int = 0
    skipped_empty: int = 0

    def add(self, other: "DocCounts") -> None:
        self.uncategorized += other.uncategorized
        self.dropped += other.dropped
        self.skipped_empty += other.skipped_empty

    def to_dict(self) -> dict:
        return {"uncategorized_docs": self.uncategorized, "dropped_docs": self.dropped,
                "skipped_empty_docs": self.skipped_empty}


def split_paragraphs(text: str) -> list[str]:
    return [p for p in _BLANK_LINE.split(text) if p.strip()]


def default_text_field(src: SourceConfig) -> str:
    if src.kind == "wiki_mixed":
        return src.text_field or "text"
    return src.text_field or ("extract" if src.kind == "wiki_offline" else "text")


def _truth_of(rec: dict, src: SourceConfig, recipe: Recipe, where) -> Optional[int]:
    """True domain of a record; None means drop it (uncategorized_policy=drop)."""
    if src.domain != "topic":
        return DOMAIN_NAMES.index(src.domain)
    t = recipe.topics
    if t.field not in rec:
        raise PrepError(f"{where}: missing field {t.field!r} (needed for topic domains)")
    topic = rec[t.field]
    if topic in t.forget:
        return FORGET
    if topic in t.adjacent:
        return ADJACENT
    if topic in t.uncategorized and t.uncategorized_policy == "drop":
        return None
    return RETAIN


def _paragraph_truth(rec: dict, src: SourceConfig, n: int, where) -> list[int]:
    name = src.paragraph_domains_field
    value = rec.get(name)
    if not isinstance(value, list) or any(v not in DOMAIN_NAMES for v in value):
        raise PrepError(f"{where}: field {name!r} must be a list of {', '.join(DOMAIN_NAMES)}")
    if len(value) != n:
        raise PrepError(f"{where}: field {name!r} has {len(value)} entries for {n} paragraphs "
                        "(paragraphs are separated by blank lines)")
    return [DOMAIN_NAMES.index(v) for v in value]


def to_doc(where, rec: dict, src: SourceConfig, recipe: Recipe, counts: DocCounts) -> Optional[Doc]:
    """Validate one record; None when the recipe drops it (counted in ``counts``)."""
    field_name = default_text_field(src)
    if field_name not in rec or rec[field_name] is None:
        keys = ", ".join(sorted(k for k in rec if not str(k).startswith("_")))
        raise PrepError(f"{where}: missing field {field_name!r} (has: {keys})")
    text = rec[field_name]
    if not isinstance(text, str):
        raise PrepError(f"{where}: field {field_name!r} is {type(text).__name__}, not text")
    if not text.strip():
        if recipe.skip_empty:
            counts.skipped_empty += 1
            return None
        raise PrepError(f"{where}: empty document (set skip_empty: true to drop empty documents)")
    truth = _truth_of(rec, src, recipe, where)
    if src.domain == "topic" and rec.get(recipe.topics.field) in recipe.topics.uncategorized:
        counts.uncategorized += 1
    if truth is None:
        counts.dropped += 1
        return None
    by_paragraph = recipe.classifier.granularity == "paragraph"
    if not (by_paragraph or src.paragraph_domains_field):
        return Doc(text, truth)
    paragraphs = split_paragraphs(text)
    ptruth = None
    if src.paragraph_domains_field:
        ptruth = _paragraph_truth(rec, src, len(paragraphs), where)
        truth = FORGET if FORGET in ptruth else ADJACENT if ADJACENT in ptruth else RETAIN
    return Doc(text, truth, paragraphs if by_paragraph else None, ptruth)


class _Where:
    """``source NAME: <where>``, formatted only when an error message needs it (a jsonl
    line number costs a scan of the file up to that line)."""

    __slots__ = ("name", "ref")

    def __init__(self, name: str, ref) -> None:
        self.name, self.ref = name, ref

    def __str__(self) -> str:
        return f"source {self.name}: {self.ref}"


@dataclass
class Keep:
    """Which valid documents of a shard survive the source's ``max_docs`` cap."""

    first_ordinal: int  # valid-document ordinal (within the source) of the shard's first document
    kept: Optional[np.ndarray] = field(default=None)  # sorted source ordinals kept; None = all

    def __contains__(self, ordinal: int) -> bool:
        if self.kept is None:
            return True
        i = np.searchsorted(self.kept, ordinal)
        return bool(i < len(self.kept) and self.kept[i] == ordinal)


def shard_docs(spec: ShardSpec, recipe: Recipe, keep: Optional[Keep] = None,
               counts: Optional[DocCounts] = None, digest=None) -> Iterator[Doc]:
    """The documents a shard contributes, in input order, after validation and the cap."""
    src = recipe.sources[spec.source]
    counts = counts if counts is not None else DocCounts()
    ordinal = keep.first_ordinal if keep else 0
    last = None if keep is None or keep.kept is None else (int(keep.kept[-1]) if len(keep.kept) else -1)
    for where, rec in shard_records(spec, src, digest):
        if last is not None and ordinal > last:
            break  # nothing further of this source is kept
        doc = to_doc(_Where(src.name, where), rec, src, recipe, counts)
        if doc is None:
            continue
        if keep is None or ordinal in keep:
            yield doc
        ordinal += 1
