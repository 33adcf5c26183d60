"""Python-kind entry points for the classifier tests: one honest scorer, one that records what
it is shown (cascade routing), and one for each way of breaking the contract."""
from __future__ import annotations

import numpy as np

from data_prep.classifiers.examples import spanish_function_words

SEEN: list[str] = []


def spanish(texts):
    return spanish_function_words(texts)


def recording(texts):
    """Scores like ``spanish`` and remembers every text it scored."""
    SEEN.extend(texts)
    return spanish_function_words(texts).tolist()


def wrong_shape(texts):
    return np.zeros((len(texts), 2))


def one_short(texts):
    return [0.5] * (len(texts) - 1)


def nan(texts):
    out = np.zeros(len(texts))
    out[-1] = np.nan
    return out


def out_of_range(texts):
    return [1.5] * len(texts)


def negative(texts):
    return [-0.25] * len(texts)


def strings(texts):
    return ["high"] * len(texts)


def raises(texts):
    raise RuntimeError("model server unreachable")


MARK = "QQNANQQ"


def nan_on_marked(texts):
    """Honest, except NaN for a text containing MARK: the test plants it in a document deep
    in the corpus, past the probe of the first sampled documents."""
    out = spanish_function_words(texts).astype(np.float64)
    out[[i for i, t in enumerate(texts) if MARK in t]] = np.nan
    return out

NOT_CALLABLE = 3
