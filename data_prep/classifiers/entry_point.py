"""The python kind: your own function, ``module:function`` or ``path/to/file.py:function``.

The contract, checked on every call:

- it is called as ``function(texts)`` with a list of at most ``classifier.batch_size``
  strings (documents, or paragraphs at paragraph granularity);
- it returns one forget score per text, in order: a list, tuple or 1-D numpy array of
  ``len(texts)`` finite numbers in [0, 1];
- it is deterministic (a rerun must give the same shards) and keeps no state between calls
  that changes its scores (shards run in any order, in several processes).

A violation (wrong shape, NaN or infinity, a value outside [0, 1], an exception) stops prep
with one ``error:`` line naming the entry point and the offending text's position. The module
is imported once per map process (at the first chunk, or before the workers fork). Its source
file is an input of the prep: editing it is a changed corpus (``--force``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from data_prep.classifiers.base import Scorer, checked_scores
from data_prep.errors import PrepError
from data_prep.recipe import ClassifierConfig


def split_entry_point(entry_point: str) -> tuple[str, str]:
    module, _, attr = entry_point.rpartition(":")
    return module, attr


def source_file(entry_point: str, where: str) -> Optional[str]:
    """The file defining the entry point's module (None for a built-in module), found
    without running the module."""
    module, _ = split_entry_point(entry_point)
    if module.endswith(".py"):
        if not Path(module).is_file():
            raise PrepError(f"{where}.entry_point {entry_point}: {module}: no such file")
        return module
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        raise PrepError(f"{where}.entry_point {entry_point}: cannot find module {module} ({e})") from None
    if spec is None:
        raise PrepError(f"{where}.entry_point {entry_point}: no module named {module} "
                        "(is its directory on PYTHONPATH?)")
    return spec.origin if spec.origin and Path(spec.origin).is_file() else None


def load_function(entry_point: str, where: str) -> Callable:
    module_name, attr = split_entry_point(entry_point)
    who = f"{where}.entry_point {entry_point}"
    try:
        if module_name.endswith(".py"):
            name = f"_sgtm_entry_point_{Path(module_name).stem}"
            spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up by name
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except PrepError:
        raise
    except Exception as e:  # the user's module: any import-time failure is their bug to see
        raise PrepError(f"{who}: importing {module_name} failed ({type(e).__name__}: {e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PrepError(f"{who}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PrepError(f"{who}: {attr} is a {type(obj).__name__}, not a function")
    return obj


class PythonScorer(Scorer):
    def __init__(self, cfg: ClassifierConfig, where: str = "classifier"):
        self.who = f"{where}.entry_point {cfg.entry_point}"
        self.fn = load_function(cfg.entry_point, where)
        self.batch_size = cfg.batch_size

    def score(self, texts: list[str]) -> np.ndarray:
        parts = []
        for i in range(0, len(texts), self.batch_size):
            batch = texts[i:i + self.batch_size]
            try:
                raw = self.fn(list(batch))
            except PrepError:
                raise
            except Exception as e:  # a bug in the user's function, reported as bad input
                raise PrepError(f"{self.who}: raised {type(e).__name__}: {e}") from None
            parts.append(checked_scores(raw, len(batch), self.who))
        return np.concatenate(parts)
