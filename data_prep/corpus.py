"""Documents with ground truth, and their train / held-out test splits.

Truth codes (also written as ``S_truth.npy``): 0 = retain, 1 = forget, 2 = adjacent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_prep.errors import PrepError
from data_prep.recipe import Recipe, SourceConfig
from data_prep.sources import SourceInfo, default_text_field, read_source

RETAIN, FORGET, ADJACENT = 0, 1, 2
DOMAIN_NAMES = ("retain", "forget", "adjacent")


@dataclass
class Corpus:
    texts: list[str]
    truth: np.ndarray  # uint8 per document
    sources: list[SourceInfo]
    uncategorized_docs: int = 0
    dropped_docs: int = 0
    skipped_empty: int = 0


@dataclass
class Split:
    name: str
    texts: list[str]
    truth: np.ndarray
    extra: dict = field(default_factory=dict)


def _truth_of(rec: dict, src: SourceConfig, recipe: Recipe, where: str) -> int | None:
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


def load_corpus(recipe: Recipe) -> Corpus:
    """Read every source, validate each record and assign its true domain."""
    texts: list[str] = []
    truth: list[int] = []
    infos: list[SourceInfo] = []
    uncategorized = dropped = skipped = 0
    for src in recipe.sources:
        records, info = read_source(src)
        infos.append(info)
        cap = src.max_docs or recipe.max_docs
        field_name = default_text_field(src)
        src_texts, src_truth = [], []
        for i, rec in enumerate(records):
            if cap and src.kind == "hf" and src.streaming and len(src_texts) >= cap:
                break  # a stream cannot be subsampled without reading it all
            where = f"source {src.name}: {rec.pop('_where', f'record {i}')}"
            if rec.get("id") is not None and src.kind == "wiki_offline":
                where = f"source {src.name}: article {rec['id']!r}"
            if field_name not in rec or rec[field_name] is None:
                keys = ", ".join(sorted(k for k in rec if not k.startswith("_")))
                raise PrepError(f"{where}: missing field {field_name!r} (has: {keys})")
            text = rec[field_name]
            if not isinstance(text, str):
                raise PrepError(f"{where}: field {field_name!r} is {type(text).__name__}, not text")
            if not text.strip():
                if recipe.skip_empty:
                    skipped += 1
                    continue
                raise PrepError(f"{where}: empty document (set skip_empty: true to drop empty documents)")
            d = _truth_of(rec, src, recipe, where)
            if src.domain == "topic" and rec.get(recipe.topics.field) in recipe.topics.uncategorized:
                uncategorized += 1
            if d is None:
                dropped += 1
                continue
            src_texts.append(text)
            src_truth.append(d)
        if not src_texts:
            raise PrepError(f"source {src.name}: no documents")
        if cap and len(src_texts) > cap:
            # A seeded subset (kept in source order) stays representative of all topics.
            rng = np.random.default_rng([recipe.split.seed, len(infos)])
            keep = np.sort(rng.choice(len(src_texts), size=cap, replace=False))
            src_texts = [src_texts[k] for k in keep]
            src_truth = [src_truth[k] for k in keep]
        texts.extend(src_texts)
        truth.extend(src_truth)
    return Corpus(texts, np.asarray(truth, dtype=np.uint8), infos, uncategorized, dropped, skipped)


def split_corpus(corpus: Corpus, recipe: Recipe) -> dict[str, Split]:
    """Hold out a seeded test set per true domain; everything else is train.

    Returns ``train``, ``test_retain``, ``test_forget`` and, when the corpus has
    adjacent documents, ``test_adjacent``. Documents keep their corpus order.
    """
    cfg = recipe.split
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(corpus.texts))
    is_test = np.zeros(len(corpus.texts), dtype=bool)
    test_idx: dict[int, np.ndarray] = {}
    for d in (RETAIN, FORGET, ADJACENT):
        members = order[corpus.truth[order] == d]
        if len(members) == 0:
            continue
        n = max(1, int(round(cfg.test_fraction * len(members))))
        if cfg.max_test_docs is not None:
            n = min(n, cfg.max_test_docs)
        if n >= len(members):
            raise PrepError(f"domain {DOMAIN_NAMES[d]}: only {len(members)} documents, "
                            "too few for a held-out test split")
        test_idx[d] = np.sort(members[:n])
        is_test[test_idx[d]] = True
    for d in (RETAIN, FORGET):
        if d not in test_idx:
            raise PrepError(f"corpus has no {DOMAIN_NAMES[d]} documents; check the recipe's domains")
    train_idx = np.flatnonzero(~is_test)
    splits = {"train": Split("train", [corpus.texts[i] for i in train_idx], corpus.truth[train_idx])}
    for d, idx in test_idx.items():
        name = f"test_{DOMAIN_NAMES[d]}"
        splits[name] = Split(name, [corpus.texts[i] for i in idx], corpus.truth[idx])
    return splits
