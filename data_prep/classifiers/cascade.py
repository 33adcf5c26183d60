"""The cascade kind: stages in order, each a classifier of its own; a text leaves at the first
stage that decides it and later stages see only what passes (Deep Ignorance's keyword
blocklist, then a model on what the blocklist flagged).

A stage that is not the last decides, at its own ``threshold``, either

- ``decides: retain`` (the default): texts scoring below it leave as retain, the rest pass on;
- ``decides: forget``: texts scoring at or above it leave as forget, the rest pass on;

and the last stage decides every text that reaches it. A text's score is the score of the
stage that decided it. The recipe check keeps the stages' decisions under the cascade's own
threshold (a retain-deciding stage's threshold is at most the cascade's, a forget-deciding
one's at least, the last stage's equal to it), so the labels are the stages' decisions; a
later ``--relabel --threshold`` moves the cut on these recorded scores like for any kind.
"""
from __future__ import annotations

import numpy as np

from data_prep.classifiers.base import Scorer, Trace
from data_prep.recipe import ClassifierConfig


class CascadeScorer(Scorer):
    def __init__(self, cfg: ClassifierConfig, stages: list[Scorer]):
        self.cfg, self.stages = cfg, stages
        self.who = "classifier (cascade)"
        self.fork_safe = all(s.fork_safe for s in stages)

    def after_fork(self) -> None:
        for s in self.stages:
            s.after_fork()

    def trace(self, texts: list[str]) -> Trace:
        n, k_stages = len(texts), len(self.stages)
        final = np.zeros(n, np.float32)
        decided_at = np.full(n, -1, np.int8)
        stage_scores = np.full((n, k_stages), np.nan, np.float32)
        active = np.arange(n)
        for k, (st, scorer) in enumerate(zip(self.cfg.stages, self.stages)):
            if not len(active):
                break
            s = scorer.trace([texts[i] for i in active]).scores
            stage_scores[active, k] = s
            if k == k_stages - 1:
                done = np.ones(len(active), bool)
            elif (st.decides or "retain") == "retain":
                done = s < st.threshold
            else:
                done = s >= st.threshold
            final[active[done]] = s[done]
            decided_at[active[done]] = k
            active = active[~done]
        return Trace(final, decided_at, stage_scores)

    def score(self, texts: list[str]) -> np.ndarray:
        return self.trace(texts).scores
