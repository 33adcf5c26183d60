"""What every classifier kind gives the pipeline: a forget score in [0, 1] per text.

A :class:`Scorer` is loaded once per process and called on batches of texts (a chunk of
documents, or their long paragraphs). :meth:`Scorer.trace` is what the encoder calls: the
scores, checked against the contract (one finite value in [0, 1] per text), plus, for a
cascade, which stage decided each text and every stage's score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_prep.errors import PrepError


@dataclass
class Trace:
    scores: np.ndarray  # float32 [n]
    stage: Optional[np.ndarray] = None  # int8 [n]: the cascade stage that decided each text
    stage_scores: Optional[np.ndarray] = None  # float32 [n, stages], NaN where not reached


def checked_scores(raw, n: int, who: str) -> np.ndarray:
    """``raw`` as float32 scores after checking the contract: a 1-D sequence of ``n`` finite
    numbers in [0, 1]. A violation is a PrepError naming ``who`` and the first bad text."""
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise PrepError(f"{who}: returned {type(raw).__name__}, not a sequence of numbers ({e}); "
                        "the contract is one score in [0, 1] per text") from None
    if arr.shape != (n,):
        raise PrepError(f"{who}: returned shape {arr.shape} for a batch of {n} texts; "
                        f"the contract is one score per text, shape ({n},)")
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        raise PrepError(f"{who}: returned {float(arr[bad[0]])} for text {bad[0]} of a batch of {n} "
                        f"({len(bad)} non-finite in all); scores must be finite numbers in [0, 1]")
    bad = np.flatnonzero((arr < 0.0) | (arr > 1.0))
    if len(bad):
        raise PrepError(f"{who}: returned {float(arr[bad[0]])} for text {bad[0]} of a batch of {n} "
                        f"({len(bad)} outside [0, 1] in all); scores must be in [0, 1]")
    return arr.astype(np.float32)


class Scorer:
    """One classifier kind, loaded. Subclasses implement :meth:`score`."""

    #: Its loaded state may be shared with forked map workers (a CUDA context may not).
    fork_safe = True
    #: Names the classifier in errors, e.g. ``classifier.entry_point m:f``.
    who = "classifier"

    def score(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def trace(self, texts: list[str]) -> Trace:
        if not texts:
            return Trace(np.zeros(0, np.float32))
        return Trace(checked_scores(self.score(texts), len(texts), self.who))

    def after_fork(self) -> None:
        """Called in each forked map worker before its first shard."""
