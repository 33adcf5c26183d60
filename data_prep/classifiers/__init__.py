"""Forget-score classifiers and their measured quality against ground truth.

Every document (or paragraph) gets a float forget-score in [0, 1]; labels come later from a
threshold (see :mod:`data_prep.noise`), so thresholds and noise can change without
re-tokenizing. One module per kind:

=========== ======================================================== =====================
kind        score                                                    module
=========== ======================================================== =====================
language    py3langid's probability of the forget language           ``language``
topic       TF-IDF + logistic regression fit on a seed split         ``topic``
oracle      the truth itself                                         ``quality``
fasttext    a fastText model's probability of ``forget_label``       ``fasttext_model``
hf          a transformers classifier's, windowed (max or mean)      ``hf_model``
keywords    ``hits / (hits + min_hits)`` over a term / regex list    ``keywords``
python      your ``module:function``, contract-checked               ``entry_point``
cascade     the score of the first stage that decides the text       ``cascade``
=========== ======================================================== =====================
"""
from data_prep.classifiers.base import Scorer, Trace, checked_scores
from data_prep.classifiers.language import LanguageScorer
from data_prep.classifiers.quality import (add_counts, counts_from_report, measure, oracle_scores, rates, seed_mask,
                                          stage_counts, stage_report)
from data_prep.classifiers.registry import (check_classifier, classifier_inputs, file_records, make_scorer,
                                            scorer_key)
from data_prep.classifiers.topic import TOPIC_FILE, TopicScorer

__all__ = ["Scorer", "Trace", "checked_scores", "LanguageScorer", "TopicScorer", "TOPIC_FILE", "measure",
           "oracle_scores", "rates", "counts_from_report", "seed_mask", "stage_counts", "add_counts", "stage_report", "make_scorer",
           "check_classifier", "classifier_inputs", "file_records", "scorer_key"]
