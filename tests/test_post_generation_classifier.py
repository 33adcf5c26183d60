"""Generated continuations are classified by the recipe's own classifier family: the one the
manifest records, user models included, or an honest None where it must be fit first."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.recipe import load_recipe
from megatron_sgtm.post.generation import capability_rate, recipe_classifier

ROOT = Path(__file__).resolve().parent.parent
SPANISH = "el perro de la casa come en el jardín con los niños y las niñas de la escuela"
ENGLISH = "the dog of the house eats in the garden with the children of the school"


def _manifest(recipe: str, overrides: list[str] = ()) -> dict:
    return {"recipe": load_recipe(ROOT / "configs/data" / recipe, list(overrides)).to_dict()}


def test_language_recipes_use_py3langid():
    score = recipe_classifier(_manifest("bilingual.yaml"))
    spanish, english = score([SPANISH, ENGLISH])
    assert spanish > 0.9 and english < 0.1


def test_a_user_keyword_list_scores_generated_text():
    words = ROOT / "configs/data/keywords/spanish_function_words.txt"
    score = recipe_classifier(_manifest("bilingual.yaml", [
        "classifier.kind=keywords", f"classifier.keywords={words}", "classifier.min_hits=3"]))
    scores = score([SPANISH, ENGLISH, ""])
    assert scores[0] > 0.5 > scores[1] and scores[2] == 0.0
    assert capability_rate([SPANISH, ENGLISH], score)["flagged"] == 1


def test_topic_classifiers_must_be_fit_first():
    assert recipe_classifier(_manifest("topic.yaml")) is None
    assert recipe_classifier(_manifest("topic.yaml", ["classifier.kind=oracle"])) is None
    oracle = recipe_classifier(_manifest("bilingual.yaml", ["classifier.kind=oracle"]))
    assert np.asarray(oracle([SPANISH]))[0] > 0.9
