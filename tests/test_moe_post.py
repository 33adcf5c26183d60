"""MoE after training (slow: trains a model with the real loop, then runs the commands):
``sgtm ablate`` removes the forget experts (router rows dropped, tokens route among the rest),
``--prune`` also removes the forget heads, ``--export hf`` writes a Mixtral model that
transformers loads with equal logits, and ``sgtm eval`` reads both outputs. Router assignments
are counted on held-out English (retain) and Spanish (forget) text."""
from __future__ import annotations

import pytest
import torch

from _workers_moe_post import world_moe_cli
from distributed import run_distributed

pytestmark = pytest.mark.slow
FORGET = [2, 5]  # block-strided forget experts of 6 (max_ep 8: two blocks of three)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return run_distributed(world_moe_cli, 1, str(tmp_path_factory.mktemp("moe_cli")),
                           timeout=900)[0]


def test_commands_succeed(cli):
    assert cli["trained"] == 20
    for name in ("ablate", "prune", "hf", "eval", "eval_hf"):
        assert cli[name][0] == 0, f"{name}: {cli[name][1]}"
    assert cli["removed"] == FORGET and cli["experts_left"] == 4 and cli["pruned_heads"] == 4
    assert cli["hf_type"] == "mixtral"


@pytest.mark.parametrize("split", ["test_forget", "test_retain"])
def test_no_held_out_token_reaches_a_removed_expert(cli, split):
    counts = cli["counts"][split]
    keep = [e for e in range(6) if e not in FORGET]
    for layer, before in counts["trained"].items():
        assert before[FORGET].sum() > 0, f"layer {layer}: forget experts unused (vacuous)"
        ablated = counts["ablated_in_memory"][layer]
        assert ablated[FORGET].sum() == 0, f"layer {layer}: {ablated.tolist()}"
        # The written checkpoint has the four retain experts, renumbered in order, and routes
        # every token exactly as the ablated model does.
        assert torch.equal(counts["abl"][layer], ablated[keep]), layer
        assert ablated.sum() == before.sum()


@pytest.mark.parametrize("split", ["test_forget", "test_retain"])
def test_written_models_and_hf_export_match_the_ablated_model(cli, split):
    ref = cli["logits"][(split, "ablated_in_memory")]
    for what, tol in (("abl", 1e-5), ("pruned", 1e-5), ("hf_ours", 1e-5), ("hf", 1e-4)):
        diff = (cli["logits"][(split, what)] - ref).abs().max().item()
        assert diff <= tol, f"{what}: logits differ by {diff}"
