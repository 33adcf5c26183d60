"""The language classifier: py3langid restricted to the recipe's languages."""
from __future__ import annotations

import numpy as np

from data_prep.classifiers.base import Scorer
from data_prep.recipe import ClassifierConfig

_IDENTIFIERS: dict = {}


def _identifier(languages: tuple[str, ...]):
    """py3langid's model, restricted; cached per process because unpacking it (LZMA)
    costs more CPU than scoring the whole embedded corpus."""
    if languages not in _IDENTIFIERS:
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

        ident = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)
        ident.set_languages(list(languages))
        _IDENTIFIERS[languages] = ident
    return _IDENTIFIERS[languages]


class LanguageScorer(Scorer):
    """py3langid restricted to the recipe's languages; score = P(forget language).

    Uses py3langid's own model and scoring rule, but walks its byte DFA for a whole
    batch at once with numpy (one vector step per byte position) instead of one
    Python step per byte per document: the same scores to float rounding (checked against
    py3langid itself), several times faster.
    """

    def __init__(self, cfg: ClassifierConfig):
        ident = _identifier(tuple(cfg.languages))
        self.identifier = ident  # the reference implementation, kept for cross-checks
        # A view, not a copy: the transition table has ~10M entries.
        self._nm = np.frombuffer(ident.tk_nextmove, dtype=np.dtype(ident.tk_nextmove.typecode))
        self._rowbase = np.asarray(ident._rowbase, dtype=np.int64)
        self._out = np.asarray(ident.tk_output, dtype=np.int64)
        self._ptc = np.asarray(ident.nb_ptc, dtype=np.float32)
        self._pc = np.asarray(ident.nb_pc, dtype=np.float32)
        self._aliases = list(ident._alias_pairs)
        self._encode = ident._encode
        self._target = list(ident.nb_classes).index(cfg.forget_language)
        self._max_chars = cfg.max_chars
        self.who = f"classifier language ({cfg.forget_language} of {', '.join(cfg.languages)})"

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Normalised class probabilities, one row per text (py3langid's norm_probs)."""
        enc = [self._encode(t[: self._max_chars]) for t in texts]
        n, k = len(enc), len(self._pc)
        lens = np.fromiter((len(b) for b in enc), dtype=np.int64, count=n)
        order = np.argsort(-lens, kind="stable")  # longest first: active docs are a prefix
        lens_sorted = lens[order]
        width = int(lens_sorted[0]) if n else 0
        # uint8: the bytes themselves (8x less memory than int64 for the same chunk).
        grid = np.zeros((n, width), dtype=np.uint8)
        grid[np.arange(width)[None, :] < lens_sorted[:, None]] = np.frombuffer(
            b"".join(enc[i] for i in order), dtype=np.uint8)
        state = np.zeros(n, dtype=np.int64)
        # Per byte position: the output feature (or -1) of every still-active document.
        # Filtering and pairing with document ids happen once at the end, not per position.
        outputs, actives = [], []
        active = n
        for t in range(width):
            while active and lens_sorted[active - 1] <= t:
                active -= 1
            s = self._nm[self._rowbase[state[:active]] + grid[:active, t]]
            state[:active] = s
            outputs.append(self._out[s])
            actives.append(active)
        scores = np.zeros((n, k), dtype=np.float32)
        f = np.concatenate(outputs) if outputs else np.zeros(0, np.int64)
        d = np.concatenate([np.arange(a) for a in actives]) if outputs else np.zeros(0, np.int64)
        d, f = d[f >= 0], f[f >= 0]
        if len(d):
            nfeat = len(self._ptc)
            # Sorted (document, feature) pairs with their counts; documents come in runs.
            pairs, counts = np.unique(d * nfeat + f, return_counts=True)
            d, f = pairs // nfeat, pairs % nfeat
            contrib = np.log1p(counts.astype(np.float32))[:, None] * self._ptc[f]
            starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
            scores[d[starts]] = np.add.reduceat(contrib, starts, axis=0)
            scores[d[starts]] += self._pc
        # Same normalisation as py3langid: temperature sqrt(bytes), then softmax.
        scores *= (1.0 / np.sqrt(np.maximum(lens_sorted, 1)))[:, None].astype(np.float32)
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        for i, j in self._aliases:
            scores[:, i] += scores[:, j]
            scores[:, j] = 0.0
        out = np.empty_like(scores)
        out[order] = scores
        return out

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return np.clip(self.probabilities(texts)[:, self._target], 0.0, 1.0).astype(np.float32)
