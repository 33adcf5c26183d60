"""Relabel a finished shard directory under a new noise policy or threshold.

Only ``train_labels.bin/.idx`` and ``manifest.json`` are rewritten (test splits are
always unlabeled); tokens, truth and scores are read, never written. This takes
seconds because labels are a function of (truth, score, policy) per document.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from data_prep import classifiers, shards
from data_prep.errors import PrepError
from data_prep.manifest import dumps, load_manifest, split_stats
from data_prep.noise import apply_policy
from data_prep.pipeline import SEED_FILE
from data_prep.recipe import NoiseConfig, recipe_from_dict


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
    policy: NoiseConfig = recipe.noise
    thr = recipe.classifier.threshold

    data = shards.read_split(d, "train")
    truth, scores = data["truth"], data["scores"]
    lengths = np.asarray(data["tokens"].sequence_lengths, dtype=np.int64).copy()
    seed_mask = np.load(d / SEED_FILE).astype(bool) if (d / SEED_FILE).exists() else np.zeros(len(truth), bool)
    del data  # release the mmaps before files are replaced

    result = apply_policy(truth, scores, lengths, thr, policy)
    metrics = classifiers.measure(scores, truth, thr, ~seed_mask)
    manifest["recipe"] = recipe.to_dict()
    manifest["noise_policy"] = {**dataclasses.asdict(policy), "threshold": thr}
    manifest["realised"] = result.report
    manifest["classifier"].update(metrics)
    manifest["splits"]["train"] = split_stats(truth, result.labels, lengths)
    with shards.staging(d) as tmp:
        shards.write_labels(tmp, "train", result.labels, lengths)
        manifest["label_sidecar_sha256"]["train"] = shards.sha256_files(
            [tmp / "train_labels.bin", tmp / "train_labels.idx"])
        (tmp / "manifest.json").write_text(dumps(manifest), encoding="utf-8")
        shards.publish(tmp, d, ["train_labels.bin", "train_labels.idx", "manifest.json"])
    return manifest
