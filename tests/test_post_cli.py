"""The post-training commands on real checkpoints: ablate (zero, prune, HF export) and eval,
and their one-line errors for bad inputs."""
from __future__ import annotations

import pytest

from _workers_post_cli import world_cli
from distributed import run_distributed


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return run_distributed(world_cli, 1, str(tmp_path_factory.mktemp("post_cli")))[0]


def test_ablate_writes_checkpoint_equal_to_retain_mode(cli):
    assert cli["ablate"][0] == 0, cli["ablate"][1]
    assert cli["abl_forget_max"] == 0.0
    assert (cli["abl_logits"] - cli["retain_logits"]).abs().max() < 1e-5


def test_prune_and_hf_export_match_the_zeroed_model(cli):
    assert cli["prune"][0] == 0 and cli["hf"][0] == 0, (cli["prune"][1], cli["hf"][1])
    assert cli["pruned_heads"] == 6
    assert (cli["pruned_logits"] - cli["retain_logits"]).abs().max() < 1e-5
    assert (cli["hf_logits"] - cli["retain_logits"]).abs().max() < 1e-4


def test_checkpoints_name_the_version_that_wrote_them(cli):
    from megatron_sgtm.version import version_string

    assert cli["ckpt_version"] == cli["ablated_version"] == version_string()


def test_eval_writes_calibrated_rows(cli):
    assert cli["eval"][0] == 0, cli["eval"][1]
    rows = cli["eval_rows"]
    assert {(r["split"], r["calibrated"]) for r in rows} == {
        ("forget", False), ("retain", False), ("forget", True), ("retain", True)}
    assert any("distribution" in r for r in rows if r["split"] == "forget")


def test_attack_and_rmu_commands_run_on_checkpoints(cli):
    assert cli["attack"][0] == 0, cli["attack"][1]
    (row,) = cli["attack_rows"]
    assert [c["step"] for c in row["curve"]] == [0, 5, 10]
    assert row["steps_to_target"] is None  # a loss of 1.0 is out of reach in 10 steps
    assert cli["rmu"][0] == 0, cli["rmu"][1]
    assert cli["rmu_eval"][0] == 0, cli["rmu_eval"][1]


@pytest.mark.parametrize("case,message", [
    ("exists", "already exists"),
    ("nopart", "no partition metadata"),
    ("tokenizer", "tokenizer mismatch"),
    ("empty", "test_forget_tokens.bin: empty (a split needs documents)"),
])
def test_bad_inputs_give_one_clear_error(cli, case, message):
    code, err = cli[case]
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
