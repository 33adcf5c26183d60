"""Model-parallel layouts equal one process: pipeline parallelism (1F1B and interleaved
virtual stages), sequence parallelism inside the engine, TP x PP, and full activation
recompute (bitwise, alone, with TP 2 + SP and with PP 2 x VP 2), each over one step of six
micro-batches with different label mixes; and the per-slice isolation of forget tokens under
PP, SP and recompute."""
from __future__ import annotations

import pytest
import torch

from _workers_pipeline import FORGET_ONLY, LAYOUTS, MIXES, run_layouts
from distributed import run_distributed

FAMILIES = ["mha_gelu", "gqa_swiglu"]
# (data.method, micro-batch label mixes)
CASES = [("sgtm", MIXES), ("gradient_routing", MIXES), ("sgtm", FORGET_ONLY)]


def _cases():
    return CASES


@pytest.fixture(scope="module")
def results():
    by_world: dict[int, list[str]] = {}
    for name, (world, _) in LAYOUTS.items():
        by_world.setdefault(world, []).append(name)
    merged: dict = {}
    for world, names in sorted(by_world.items()):
        ranks = run_distributed(run_layouts, world, names, FAMILIES, _cases(), timeout=900)
        for key in ranks[0]:
            losses = [r[key]["loss"] for r in ranks if r[key]["loss"] is not None]
            grads = {}
            for r in ranks:
                grads.update(r[key]["grads"])
            merged[key] = {"loss": losses[0], "grads": grads}
    return merged


def _compare(ours, ref, exact: bool, what: str):
    assert (ours["loss"] == ref["loss"]) if exact else \
        ours["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), \
        f"{what}: loss {ours['loss']} vs {ref['loss']}"
    plain = {k: v for k, v in ours["grads"].items() if not k.startswith("copy:")}
    assert plain.keys() == ref["grads"].keys(), what
    for name, grad in plain.items():
        expected = ref["grads"][name]
        if exact:
            assert torch.equal(grad, expected), f"{what}: {name} not bitwise equal"
        else:
            diff = (grad - expected).abs().max().item()
            assert diff <= 2e-5 * max(1.0, expected.abs().max().item()), \
                f"{what}: {name} differs by {diff}"
    for name, grad in ours["grads"].items():  # a tied embedding's copy on the last stage
        if name.startswith("copy:"):
            assert torch.allclose(grad, ours["grads"]["embedding.word_embeddings.weight"],
                                  atol=1e-6), f"{what}: {name} out of sync"


KEYS = [(f, m, str(mixes)) for f in FAMILIES for m, mixes in _cases()]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "pp2_vp2", "tp2_sp", "tp2_pp2", "tp2_pp2_sp"])
def test_layout_equals_single_process(results, layout):
    for family, method, mixes in KEYS:
        _compare(results[(layout, family, method, mixes)], results[("tp1", family, method, mixes)],
                 exact=False, what=f"{layout} {family} {method} {mixes}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1_recompute", "tp1_recompute_2"])
def test_full_recompute_is_bitwise_equal(results, layout):
    for family, method, mixes in KEYS:
        _compare(results[(layout, family, method, mixes)], results[("tp1", family, method, mixes)],
                 exact=True, what=f"{layout} {family} {method} {mixes}")


@pytest.mark.slow
def test_pipeline_with_recompute_equals_single_process(results):
    for family, method, mixes in KEYS:
        _compare(results[("pp2_recompute", family, method, mixes)],
                 results[("tp1", family, method, mixes)], exact=False,
                 what=f"pp2_recompute {family} {method} {mixes}")


@pytest.mark.slow
@pytest.mark.parametrize("layout,base", [("tp2_sp_recompute", "tp2_sp"),
                                         ("pp2_vp2_recompute", "pp2_vp2")])
def test_full_recompute_with_sp_and_interleaving_is_bitwise_equal(results, layout, base):
    """Recompute changes no arithmetic of the layout it runs in (the recomputed forward
    re-gathers the same sequence-parallel slices, re-enters the same micro-batch's routing
    under the interleaved schedule's reordered backwards), and equals one process."""
    for family, method, mixes in KEYS:
        what = f"{layout} {family} {method} {mixes}"
        ref = results[(base, family, method, mixes)]
        _compare(results[(layout, family, method, mixes)], {"loss": ref["loss"], "grads": {
            k: v for k, v in ref["grads"].items() if not k.startswith("copy:")}},
            exact=True, what=what)
        _compare(results[(layout, family, method, mixes)], results[("tp1", family, method, mixes)],
                 exact=False, what=what)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "pp2_vp2", "tp2_sp", "tp2_pp2_sp", "tp1_recompute",
                                    "tp2_sp_recompute", "pp2_vp2_recompute"])
def test_forget_tokens_leave_retain_slices_at_zero(results, layout):
    """A step of forget-only micro-batches: every retain slice of every block gets exactly 0,
    every forget slice learns."""
    from _workers_pipeline import experiment
    from megatron_sgtm.partition import build_partition

    for family in FAMILIES:
        cfg = experiment(family, "tp1", "sgtm")
        part = build_partition(cfg.model, cfg.partition, cfg.routing)
        local = part.local(1, 0)
        grads = results[(layout, family, "sgtm", str(FORGET_ONLY))]["grads"]
        for name, grad in grads.items():
            role = next((r for r in ("qkv", "proj", "fc1", "fc2") if f"linear_{r}." in name), None)
            if role is None or name.startswith("copy:"):
                continue
            units = list(local.units(role))
            axis = 1 if role in ("proj", "fc2") and name.endswith("weight") else 0
            if role in ("proj", "fc2") and name.endswith("bias"):
                assert grad.abs().max() == 0, f"{layout}: {name} (retain bias) learned"
                continue
            keep = torch.ones(grad.shape[axis], dtype=torch.bool)
            keep[units] = False
            retain = grad.index_select(axis, keep.nonzero().squeeze(1))
            forget = grad.index_select(axis, torch.tensor(units))
            assert retain.abs().max() == 0, f"{layout} {family}: {name} retain slice learned"
            assert forget.abs().max() > 0, f"{layout} {family}: {name} forget slice idle"
