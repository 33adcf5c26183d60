"""Recipe fingerprints stay stable across releases: a shard directory prepared before a
setting existed is still recognised as the same corpus (continued, extended, relabelled),
while any setting that changes the output changes the fingerprint."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from data_prep.pipeline import recipe_fingerprint
from data_prep.recipe import LATER_CLASSIFIER_KEYS, ClassifierConfig, load_recipe

ROOT = Path(__file__).resolve().parent.parent
# What the first prep format computed for the shipped recipes (megatron_sgtm 0.1.0 before the
# user-classifier kinds): directories prepared then must not be refused now.
FIRST_FORMAT = {
    "bilingual": "0ba63f90fd98dc7f9e82993e2ac273a8b5599c960b9a5b30d33723665c1e46d8",
    "topic": "32c5bcdaa22703af7f1038510b8c09fa850bdb4ce3d71496e55f08fc61eadc05",
}
FIRST_FORMAT_CLASSIFIER_KEYS = {"kind", "languages", "forget_language", "threshold", "max_chars",
                                "seed_fraction", "seed", "granularity", "min_paragraph_chars"}


@pytest.mark.parametrize("name", sorted(FIRST_FORMAT))
def test_shipped_recipes_keep_their_first_format_fingerprint(name):
    assert recipe_fingerprint(load_recipe(ROOT / f"configs/data/{name}.yaml")) == FIRST_FORMAT[name]


def test_every_later_classifier_key_is_left_out_at_its_default():
    keys = {f.name for f in dataclasses.fields(ClassifierConfig)}
    assert keys - FIRST_FORMAT_CLASSIFIER_KEYS == set(LATER_CLASSIFIER_KEYS)


@pytest.mark.parametrize("override", ["classifier.batch_size=8", "classifier.case_fold=false",
                                      "classifier.threshold=0.7", "tokenizer.vocab_size=1024"])
def test_a_setting_that_differs_changes_the_fingerprint(override):
    recipe = ROOT / "configs/data/bilingual.yaml"
    assert recipe_fingerprint(load_recipe(recipe, [override])) != FIRST_FORMAT["bilingual"]
