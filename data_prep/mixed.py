"""``wiki_mixed``: documents of several paragraphs that mix languages, with paragraph truth.

Real pages mix domains (a Spanish page with untranslated English paragraphs). This builds
such a corpus from the embedded Wikipedia leads, each lead one paragraph: every document
takes 2-5 leads joined by blank lines, and records which paragraph is which in
``paragraph_domains`` (English = retain, Spanish = forget). A seeded third of the documents
is English only, a sixth Spanish only, and the rest mixed: a majority language with one or
two paragraphs of the other at random places. Every lead is used at most once.
"""
from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from data_prep.recipe import SourceConfig

KINDS = ("en", "es", "mixed")
SHARES = (1 / 3, 1 / 6, 1 / 2)


def mixed_records(src: SourceConfig, raw_en: bytes, raw_es: bytes) -> Iterator[tuple[str, dict]]:
    en = [r["extract"] for r in json.loads(raw_en).values() if r.get("extract", "").strip()]
    es = [r["extract"] for r in json.loads(raw_es).values() if r.get("extract", "").strip()]
    rng = np.random.default_rng([src.mix_seed, 11])
    pools = {"retain": [en[i] for i in rng.permutation(len(en))],
             "forget": [es[i] for i in rng.permutation(len(es))]}
    used = {"retain": 0, "forget": 0}
    doc = 0
    while True:
        kind = KINDS[int(rng.choice(3, p=SHARES))]
        n = int(rng.integers(2, 6))
        if kind == "en":
            domains = ["retain"] * n
        elif kind == "es":
            domains = ["forget"] * n
        else:
            major, minor = ("retain", "forget") if rng.random() < 0.5 else ("forget", "retain")
            k = int(rng.integers(1, min(2, n - 1) + 1))
            domains = [major] * n
            for i in rng.choice(n, size=k, replace=False):
                domains[int(i)] = minor
        if any(used[d] + domains.count(d) > len(pools[d]) for d in pools):
            return
        paragraphs = []
        for d in domains:
            # A lead's own blank lines would split it into paragraphs of unrecorded truth.
            paragraphs.append(" ".join(pools[d][used[d]].split()))
            used[d] += 1
        yield f"mixed document {doc}", {"text": "\n\n".join(paragraphs), "paragraph_domains": domains}
        doc += 1
