"""Hidden and embedding dropout masks depend on the seed, the layer, the site and each
sequence's global place in the data order only: one step with dropout at TP 2 + SP, PP 2 x VP 2
and under full recompute equals one process (recompute bitwise), and DP 2 trains the run one
process trains (tests/test_train_parallel.py); a sequence-parallel slice draws the rows of
the whole sequence's mask."""
from __future__ import annotations

import pytest
import torch

from _workers_pipeline import MIXES, run_layouts
from distributed import run_distributed
from megatron_sgtm import dropout

FAMILY = "mha_gelu_dropout"


def test_a_sequence_parallel_slice_draws_the_rows_of_the_whole_mask():
    site = dropout.site_seed(3, 1, "mlp_bda")
    whole = dropout.keep_mask(site, dropout.DropoutKeys((5, 9), 8), 8, 16, 0.3, "cpu")
    parts = [dropout.keep_mask(site, dropout.DropoutKeys((5, 9), 8, (r, 4)), 2, 16, 0.3, "cpu")
             for r in range(4)]
    assert torch.equal(torch.cat(parts, 0), whole)
    assert not torch.equal(whole[:, 0], whole[:, 1])  # another sequence, another mask
    other = dropout.keep_mask(dropout.site_seed(3, 2, "mlp_bda"), dropout.DropoutKeys((5, 9), 8),
                              8, 16, 0.3, "cpu")
    assert not torch.equal(whole, other)  # another layer, another mask
    big = dropout.keep_mask(site, dropout.DropoutKeys(tuple(range(64)), 64), 64, 64, 0.3, "cpu")
    assert big.float().mean().item() == pytest.approx(0.7, abs=0.01)


def test_training_with_dropout_needs_the_sample_positions():
    x = torch.ones(4, 2, 8)
    with pytest.raises(RuntimeError, match="sample positions"):
        dropout.keyed_dropout(x, 0.1, 7)
    with dropout.keyed([3, 4], 4):
        out = dropout.keyed_dropout(x, 0.5, 7)
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError, match="sequence-parallel slice"), dropout.keyed([3, 4], 6):
        dropout.keyed_dropout(x, 0.5, 7)


@pytest.fixture(scope="module")
def results():
    cases = [("sgtm", MIXES)]
    out = run_distributed(run_layouts, 1, ["tp1", "tp1_recompute"], [FAMILY, "mha_gelu"], cases)[0]
    for rank in run_distributed(run_layouts, 2, ["tp2_sp", "pp2_vp2"], [FAMILY], cases):
        for key, value in rank.items():
            merged = out.setdefault(key, {"loss": None, "grads": {}})
            merged["loss"] = value["loss"] if value["loss"] is not None else merged["loss"]
            merged["grads"].update(value["grads"])
    return out


def _key(layout, family=FAMILY):
    return (layout, family, "sgtm", str(MIXES))


@pytest.mark.slow
@pytest.mark.parametrize("layout,exact", [("tp1_recompute", True), ("tp2_sp", False),
                                          ("pp2_vp2", False)])
def test_a_step_with_dropout_is_the_same_at_every_layout(results, layout, exact):
    ref, got = results[_key("tp1")], results[_key(layout)]
    assert got["loss"] == ref["loss"] if exact else got["loss"] == pytest.approx(ref["loss"],
                                                                                 rel=1e-5)
    for name, grad in ref["grads"].items():
        theirs = got["grads"][name]
        if exact:
            assert torch.equal(theirs, grad), (layout, name)
        else:
            diff = (theirs - grad).abs().max().item()
            assert diff <= 2e-5 * max(1.0, grad.abs().max().item()), (layout, name, diff)


@pytest.mark.slow
def test_dropout_is_on(results):
    assert results[_key("tp1")]["loss"] != results[_key("tp1", "mha_gelu")]["loss"]
