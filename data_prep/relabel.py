"""Relabel a finished shard directory under a new noise policy or threshold.

Only the train label sidecars (``train/shard-*_labels.bin/.idx`` and ``_label_runs.npy``)
and ``manifest.json`` are rewritten, with each shard's label facts (test splits are always
unlabeled); tokens, truth and scores are never written. This takes seconds because labels
are a function of (truth, score, policy) per unit (document, or paragraph span), which the
reduce reads from the small sidecars. A directory prepped before facts were recorded has
its token files read once here, so the relabelled manifest records every shard's facts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from data_prep.classifiers import counts_from_report
from data_prep.errors import PrepError
from data_prep.manifest import load_manifest
from data_prep.recipe import recipe_from_dict
from data_prep.reduce import label_shards


def relabel(directory: str | Path, undiscovered_rate: Optional[float] = None,
            false_positive_rate: Optional[float] = None, retain_mode_share: Optional[float] = None,
            seed: Optional[int] = None, threshold: Optional[float] = None) -> dict:
    """New train labels for ``directory``; unspecified settings keep their current value."""
    d = Path(directory)
    manifest = load_manifest(d)
    if manifest is None:
        raise PrepError(f"relabel {d}: no manifest.json (not a finished shard directory)")
    recipe_dict = json.loads(json.dumps(manifest["recipe"]))
    noise = recipe_dict["noise"]
    for key, value in (("undiscovered_rate", undiscovered_rate), ("false_positive_rate", false_positive_rate),
                       ("retain_mode_share", retain_mode_share), ("seed", seed)):
        if value is not None:
            noise[key] = value
    if threshold is not None:
        recipe_dict["classifier"]["threshold"] = threshold
    recipe = recipe_from_dict(recipe_dict)  # validates the new rates with the usual messages
    entries = manifest["splits"]["train"]["shards"]
    for e in entries:  # sizes of every file the manifest lists (full checksums: the reduce's job)
        for name, rec in e["files"].items():
            p = d / name
            if not p.is_file() or p.stat().st_size != rec["bytes"]:
                raise PrepError(f"relabel {d}: {p} is missing or not the size the manifest records")
    base = {k: manifest[k] for k in ("tokenizer", "token_dtype", "sources", "corpus")}
    base["test_splits"] = sorted(k for k in manifest["splits"] if k != "train")
    # What the map measured and hashed stays: a new policy does not change the classifier.
    base["classifier_files"] = manifest["classifier"].get("files", {})
    base["classifier_stage_counts"] = counts_from_report(manifest["classifier"].get("stages"))
    return label_shards(recipe, d, entries, base, log=lambda msg: None)
