"""The keywords kind: a list of terms and regular expressions, the cheap first stage of most
filtering pipelines.

The list file (UTF-8) has one entry per line; blank lines and lines starting with ``#`` are
skipped. An entry is

- a **term**: one or more words, matched as whole words in sequence. Words are runs of
  letters, digits and underscores; anything else (spaces, hyphens, punctuation) separates
  them, in the term and in the text alike, so ``e-coli`` matches "E. coli" and "e coli";
- or ``re:PATTERN``, a Python regular expression, counted once per non-overlapping match;

optionally followed by a TAB and a positive weight (default 1). ``classifier.case_fold``
(default true) matches regardless of case. A text's hits are the summed weights of every
occurrence (``classifier.distinct_terms``: of every entry found at least once), and its score
is ``hits / (hits + min_hits)``: 0 without hits, 0.5 at exactly ``min_hits``, towards 1 above.
With the default threshold 0.5 a text is flagged exactly when its hits reach ``min_hits``.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.classifiers.base import Scorer
from data_prep.errors import PrepError
from data_prep.recipe import ClassifierConfig

WORD = re.compile(r"\w+")


@dataclass
class KeywordList:
    # Terms by their word count -> weight; a term is its word (one word) or word tuple.
    terms: dict[int, dict[object, float]] = field(default_factory=dict)
    patterns: list[tuple[re.Pattern, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(t) for t in self.terms.values()) + len(self.patterns)


def read_keywords(path: str, case_fold: bool, where: str = "classifier") -> KeywordList:
    p = Path(path)
    who = f"{where}.keywords {p}"
    try:
        text = p.read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise PrepError(f"{who}: is a directory, not a keyword list") from None
    except FileNotFoundError:
        raise PrepError(f"{who}: no such file") from None
    except OSError as e:
        raise PrepError(f"{who}: unreadable ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PrepError(f"{who}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    out = KeywordList()
    seen: dict[object, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry, weight = _split_weight(line, f"{p}:{n}")
        if entry.startswith("re:"):
            try:
                rx = re.compile(entry[3:], re.IGNORECASE if case_fold else 0)
            except re.error as e:
                raise PrepError(f"{p}:{n}: not a valid regular expression ({e}): {entry[3:]!r}") from None
            if rx.search(""):
                raise PrepError(f"{p}:{n}: the regular expression {entry[3:]!r} matches the empty string")
            key: object = ("re", rx.pattern)
            out.patterns.append((rx, weight))
        else:
            words = tuple(WORD.findall(entry.casefold() if case_fold else entry))
            if not words:
                raise PrepError(f"{p}:{n}: the term {entry!r} has no letters or digits "
                                "(write a regular expression as re:PATTERN)")
            key = words if len(words) > 1 else words[0]  # one-word terms: plain strings
            out.terms.setdefault(len(words), {})[key] = weight
        if key in seen:
            raise PrepError(f"{p}:{n}: repeats the entry of line {seen[key]}")
        seen[key] = n
    if not len(out):
        raise PrepError(f"{who}: no terms or patterns in it")
    return out


def _split_weight(line: str, where: str) -> tuple[str, float]:
    entry, tab, raw = line.rstrip("\r\n").rpartition("\t")
    if not tab:
        return line.strip(), 1.0
    try:
        weight = float(raw)
    except ValueError:
        raise PrepError(f"{where}: weight {raw!r} after the TAB is not a number") from None
    if not (math.isfinite(weight) and weight > 0):
        raise PrepError(f"{where}: weight {raw!r} must be a positive number")
    return entry.strip(), weight


class KeywordScorer(Scorer):
    def __init__(self, cfg: ClassifierConfig, where: str = "classifier"):
        self.who = f"{where}.keywords {cfg.keywords}"
        self.list = read_keywords(cfg.keywords, cfg.case_fold, where)
        self.case_fold, self.distinct, self.min_hits = cfg.case_fold, cfg.distinct_terms, cfg.min_hits

    def hits(self, text: str) -> float:
        folded = text.casefold() if self.case_fold else text
        words = WORD.findall(folded)
        total = 0.0
        for n, terms in self.list.terms.items():
            grams = Counter(words if n == 1 else zip(*(words[i:] for i in range(n))))
            # Walk the smaller side: a long list over a short text, or the reverse.
            if len(terms) <= len(grams):
                found = ((terms[t], grams[t]) for t in terms if t in grams)
            else:
                found = ((terms[g], c) for g, c in grams.items() if g in terms)
            total += sum(w if self.distinct else w * c for w, c in found)
        for rx, w in self.list.patterns:
            if self.distinct:
                total += w if rx.search(text) else 0.0
            else:
                total += w * sum(1 for _ in rx.finditer(text))
        return total

    def score(self, texts: list[str]) -> np.ndarray:
        h = np.fromiter((self.hits(t) for t in texts), np.float64, count=len(texts))
        return (h / (h + self.min_hits)).astype(np.float32)
