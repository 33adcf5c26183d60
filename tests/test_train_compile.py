"""``train.compile``: the compiled SGTM training run at TP=2 gives the eager run's losses, with
no graph breaks (a break splits every block into pieces that cannot fuse or be captured).

The backend is aot_eager: it traces the model (dynamo) and its backward (AOTAutograd) exactly
as inductor does, without inductor's CPU code generation, which takes a minute per process
here. GPU runs use inductor (bench/gpu.py measures it).
"""
from __future__ import annotations

import pytest

from _workers_train import losses, train_compiled
from distributed import run_distributed
from megatron_sgtm.data.testing import write_sample_shards


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shards = tmp_path_factory.mktemp("shards")
    write_sample_shards(shards, n_train=200, n_test=20)
    root = tmp_path_factory.mktemp("runs")
    results = run_distributed(train_compiled, 2, str(shards), str(root), "aot_eager")
    return root, results


@pytest.mark.slow
def test_compiled_run_matches_eager(runs):
    root, results = runs
    assert "error" not in results[0]["compiled"], results[0]["compiled"]
    eager, compiled = losses(root / "eager"), losses(root / "compiled")
    assert len(eager) == 6
    assert compiled == pytest.approx(eager, rel=1e-6)
    assert results[0]["compiled"]["eval"] == pytest.approx(results[0]["eager"]["eval"], rel=1e-6)


@pytest.mark.slow
def test_compiled_model_has_no_graph_breaks(runs):
    _, results = runs
    for rank in results:
        assert rank["graph_breaks"] == 0
        # Train and eval mode, with and without forget tokens: a handful of graphs, not one
        # per step (guards are on bools, not on counts).
        assert 0 < rank["unique_graphs"] <= 8, rank["unique_graphs"]
