"""From a recipe's classifier settings to a loaded scorer, the files it reads, and the checks
that run before prep writes anything.

- :func:`make_scorer` loads a classifier once per process: the result is cached under its
  settings and the size and mtime of its files, so the global stage, every shard of a worker
  and forked workers share one loaded model, and a changed model file is loaded afresh.
- :func:`classifier_inputs` lists the files a classifier reads (a fastText model, every file
  of a Hugging Face directory, a keyword list, a python entry point's source). They are
  inputs of the prep like the corpus: their stamps join ``.prep/inputs.json`` (a changed file
  is refused without ``--force``) and their sha256 the manifest and its corpus fingerprint.
- :func:`check_classifier` loads the classifier and scores a probe batch of real documents,
  so a bad model, label, list or entry point stops prep before a shard is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from data_prep import shards
from data_prep.classifiers.base import Scorer
from data_prep.errors import PrepError
from data_prep.recipe import ClassifierConfig

_LOADED: dict[str, Scorer] = {}
PROBE_TEXTS = 32


def _files_of(cfg: ClassifierConfig, where: str) -> list[str]:
    if cfg.kind == "fasttext":
        p = Path(cfg.model)
        if not p.is_file():
            raise PrepError(f"{where}.model: {p}: {'is a directory, not' if p.is_dir() else 'no such file, expected'} "
                            "a fastText .bin model")
        return [str(p)]
    if cfg.kind == "hf":
        p = Path(cfg.model)
        if not p.is_dir():
            raise PrepError(f"{where}.model: {p}: {'not a directory' if p.exists() else 'no such directory'}, "
                            "expected a Hugging Face model directory (save_pretrained)")
        return sorted(str(f) for f in p.rglob("*") if f.is_file())
    if cfg.kind == "keywords":
        p = Path(cfg.keywords)
        if not p.exists():
            raise PrepError(f"{where}.keywords: {p}: no such file")
        return [str(p)]
    if cfg.kind == "python":
        from data_prep.classifiers.entry_point import source_file

        src = source_file(cfg.entry_point, where)
        return [src] if src else []
    if cfg.kind == "cascade":
        return [f for i, st in enumerate(cfg.stages) for f in _files_of(st, f"{where}.stages[{i}]")]
    return []


def classifier_inputs(cfg: ClassifierConfig) -> list[str]:
    """Every file the classifier reads, in a fixed order (no duplicates); PrepError naming
    the recipe key when one is missing."""
    return list(dict.fromkeys(_files_of(cfg, "classifier")))


def file_records(cfg: ClassifierConfig) -> dict[str, dict]:
    """Size and sha256 of every classifier file, for the manifest."""
    return {p: shards.file_record(Path(p).parent, Path(p).name) for p in classifier_inputs(cfg)}


def _key(cfg: ClassifierConfig) -> str:
    stamps = {}
    for p in classifier_inputs(cfg):
        st = os.stat(p)
        stamps[p] = [st.st_size, st.st_mtime_ns]
    return json.dumps([dataclasses.asdict(cfg), stamps], sort_keys=True)


def _load(cfg: ClassifierConfig, where: str) -> Scorer:
    if cfg.kind == "language":
        from data_prep.classifiers.language import LanguageScorer

        return LanguageScorer(cfg)
    if cfg.kind == "fasttext":
        from data_prep.classifiers.fasttext_model import FastTextScorer

        return FastTextScorer(cfg, where)
    if cfg.kind == "hf":
        from data_prep.classifiers.hf_model import HFScorer

        return HFScorer(cfg, where)
    if cfg.kind == "keywords":
        from data_prep.classifiers.keywords import KeywordScorer

        return KeywordScorer(cfg, where)
    if cfg.kind == "python":
        from data_prep.classifiers.entry_point import PythonScorer

        return PythonScorer(cfg, where)
    if cfg.kind == "cascade":
        from data_prep.classifiers.cascade import CascadeScorer

        return CascadeScorer(cfg, [_cached(st, f"{where}.stages[{i}]") for i, st in enumerate(cfg.stages)])
    raise PrepError(f"{where}.kind: {cfg.kind!r} has no scorer")


def _cached(cfg: ClassifierConfig, where: str) -> Scorer:
    key = where + _key(cfg)  # where: its errors name the recipe key it came from
    if key not in _LOADED:
        _LOADED[key] = _load(cfg, where)
    return _LOADED[key]


def scorer_key(cfg: ClassifierConfig) -> str:
    """Identifies the loaded classifier: its settings and its files' stamps."""
    return _key(cfg)


def make_scorer(cfg: ClassifierConfig, state_dir: Path) -> Optional[Scorer]:
    """The forget scorer of a map task; None for the oracle (scores from truth). The topic
    classifier is read from the global stage's ``state_dir``."""
    if cfg.kind == "oracle":
        return None
    if cfg.kind == "topic":
        from data_prep.classifiers.topic import TopicScorer

        return TopicScorer.load(state_dir, cfg)
    return _cached(cfg, "classifier")


def check_classifier(cfg: ClassifierConfig, texts: list[str]) -> None:
    """Load the classifier and score up to PROBE_TEXTS of ``texts`` (the first sampled
    documents) through the contract check. Topic and oracle have nothing to load yet."""
    if cfg.kind in ("topic", "oracle"):
        return
    probe = texts[:PROBE_TEXTS]
    scorer = make_scorer(cfg, Path())
    scorer.trace(probe)
    # Later stages see only what earlier ones pass, maybe nothing of the probe: try each.
    for stage in getattr(scorer, "stages", []):
        stage.trace(probe)
