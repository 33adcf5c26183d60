"""Classifiers built inside the tests: a fastText model trained on a recipe's documents (the
recipe's held-out split left out), a tiny random Hugging Face classifier, the keyword list."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SPANISH_WORDS = ROOT / "configs/data/keywords/spanish_function_words.txt"
# A small fastText model (a few MB; trains in about a second on the test corpora).
FASTTEXT_SETTINGS = {"epoch": 10, "dim": 16, "word_ngrams": 2, "bucket": 20_000}


def train_fasttext(recipe: Path | str, out: Path, overrides: list[str], **settings) -> Path:
    pytest.importorskip("fasttext", reason="the classifiers extra (fasttext-numpy2-wheel) is not installed")
    from data_prep.classifiers.train_fasttext import train

    train(load_recipe(recipe, overrides), out, **{**FASTTEXT_SETTINGS, **settings})
    return out


def tiny_hf(out: Path, texts: list[str], head: bool = True) -> Path:
    pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")
    from data_prep.classifiers.examples import tiny_hf_classifier

    return tiny_hf_classifier(out, texts, head=head)


def fasttext_args(model: Path, prefix: str = "classifier") -> list[str]:
    return [f"{prefix}.kind=fasttext", f"{prefix}.model={model}", f"{prefix}.forget_label=__label__forget"]


def keyword_args(prefix: str = "classifier", min_hits: int = 5) -> list[str]:
    return [f"{prefix}.kind=keywords", f"{prefix}.keywords={SPANISH_WORDS}", f"{prefix}.min_hits={min_hits}"]


def cascade_args(model: Path) -> list[str]:
    """Deep Ignorance's shape on the bilingual corpus: a keyword list decides what it does
    not flag as retain, a fastText model decides the rest."""
    return ["classifier.kind=cascade",
            f"classifier.stages=[{{kind: keywords, keywords: {SPANISH_WORDS}, min_hits: 5}}, "
            f"{{kind: fasttext, model: {model}, forget_label: __label__forget}}]"]
