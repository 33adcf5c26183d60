"""The fasttext kind: a fastText supervised model (``.bin`` / ``.ftz``), score = the
probability the model gives the forget label.

Any supervised fastText classifier works: DCLM- or FineWeb-Edu-style quality filters, topic or
language models. fastText reads one line per prediction, so newlines become spaces (the same
as fastText's own tokenizer treats them inside a line). All labels are predicted (``k=-1``),
so a text gets the forget label's probability even when it is not the top label. Needs the
``classifiers`` extra (``fasttext-numpy2-wheel``).
"""
from __future__ import annotations

import numpy as np

from data_prep.classifiers.base import Scorer
from data_prep.errors import PrepError
from data_prep.recipe import ClassifierConfig


def import_fasttext(who: str):
    try:
        import fasttext
    except ImportError:
        raise PrepError(f"{who}: needs the fasttext package (pip install 'megatron_sgtm[classifiers]', "
                        "which installs fasttext-numpy2-wheel)") from None
    return fasttext


class FastTextScorer(Scorer):
    def __init__(self, cfg: ClassifierConfig, where: str = "classifier"):
        self.who = f"{where}.model {cfg.model}"
        fasttext = import_fasttext(self.who)
        try:
            self.model = fasttext.load_model(str(cfg.model))
        except (ValueError, RuntimeError, OSError) as e:
            raise PrepError(f"{self.who}: not a fastText model ({e})") from None
        labels = list(self.model.get_labels())
        if cfg.forget_label not in labels:
            shown = ", ".join(labels[:20]) + (f" ... ({len(labels)} in all)" if len(labels) > 20 else "")
            raise PrepError(f"{where}.forget_label: {cfg.forget_label!r} is not a label of {cfg.model} "
                            f"(its labels: {shown})")
        self.forget_label = cfg.forget_label

    def score(self, texts: list[str]) -> np.ndarray:
        lines = [t.replace("\r", " ").replace("\n", " ") for t in texts]
        labels, probs = self.model.predict(lines, k=-1)
        out = np.zeros(len(lines), np.float32)
        for i, (ls, ps) in enumerate(zip(labels, probs)):
            for label, p in zip(ls, ps):
                if label == self.forget_label:
                    out[i] = p
                    break
        # fastText's softmax can exceed 1 by a float rounding step.
        return np.clip(out, 0.0, 1.0)
