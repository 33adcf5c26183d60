"""The reader presents a manifest's shards as one dataset: the same batches, and the same
training run, as the same corpus prepared into one shard per input file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from _workers_train import losses, read_metrics, train_variants
from data_prep.cli import main
from distributed import run_distributed
from megatron_sgtm.data import DataError, TrainBatches, open_split
from megatron_sgtm.data.concat import FlatConcat
from prep_corpus import RECIPE_OVERRIDES, write_corpus


@pytest.fixture(scope="module")
def preps(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    recipe = write_corpus(root)
    out = {}
    for name, target in (("many", "48000"), ("one", "100000000")):
        out[name] = root / name
        assert main(["--recipe", str(recipe), "--out", str(out[name]), "--no-progress", "--workers", "2",
                     *RECIPE_OVERRIDES, f"sharding.target_bytes={target}"]) == 0
    return out


def test_flat_concat_reads_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 100, n).astype(np.uint16) for n in (5, 0, 17, 3)]
    whole, cat = np.concatenate(parts), FlatConcat(parts)
    assert len(cat) == len(whole) and cat.dtype == np.uint16
    pos = rng.integers(0, len(whole), 50)
    assert np.array_equal(cat[pos], whole[pos]) and np.array_equal(cat[pos.reshape(5, 10)], whole[pos].reshape(5, 10))
    for a, b in ((0, 25), (3, 9), (4, 23), (22, 22)):
        assert np.array_equal(cat[a:b], whole[a:b])


def test_same_documents_and_batches(preps):
    many, one = open_split(preps["many"], "train"), open_split(preps["one"], "train")
    assert len(many.prefixes) > len(one.prefixes) == 2
    for name in ("doc_lengths", "doc_offsets", "doc_labels", "doc_truth", "doc_scores"):
        assert np.array_equal(getattr(many, name), getattr(one, name)), name
    a = TrainBatches(many, 64, 4, 0, 1, 0, "sgtm", use_cache=False)
    b = TrainBatches(one, 64, 4, 0, 1, 0, "sgtm", use_cache=False)
    assert a.key == b.key and a.num_samples == b.num_samples
    for step in range(0, a.num_samples, 37):
        x, y = a.batch_at(step), b.batch_at(step)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_manifest_counts_checked_per_shard(preps, tmp_path):
    d = tmp_path / "edited"
    shutil.copytree(preps["many"], d)
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["train"]["shards"][1]["num_docs"] += 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="train/shard-00001_tokens.idx: .* but the manifest lists"):
        open_split(d, "train")


def test_training_on_many_shards_equals_one_shard(preps, tmp_path):
    root = tmp_path / "runs"
    res = run_distributed(train_variants, 1, str(preps["one"]), str(root), [
        ("one", 6, []), ("many", 6, [f"data.dir={preps['many']}"])])[0]
    assert "error" not in res["one"] and "error" not in res["many"], res
    assert len(losses(str(root / "one"))) == 6
    assert losses(str(root / "one")) == losses(str(root / "many"))
    assert res["one"]["eval"] == res["many"]["eval"]
    assert len(read_metrics(str(root / "one"))) > 0
