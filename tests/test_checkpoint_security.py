"""Loading a checkpoint never runs code from it (one real trained checkpoint per engine).

A pickle payload is planted in each file type a checkpoint holds (with the checksums re-sealed,
as an attacker who knows the format would), and every command that loads a checkpoint runs
on it: ablate, eval, attack, rmu, `sgtm train` resuming and the torchrun entry resuming. The
payload never runs; a command that reads the file fails with one `error:` line naming it.
Format-1 checkpoints are refused unless trusted; checksum damage is one error naming the file,
with the checkpoint untouched; a safetensors HF export runs eval/attack/rmu with every
unpickler disabled.
"""
from __future__ import annotations

import pytest

from _workers_security import PLANTS, commands, world_security
from distributed import run_distributed

pytestmark = pytest.mark.slow  # one spawn for the whole module, about a minute on 2 cores

POST = ("ablate", "eval", "attack", "rmu")
COMMANDS = (*POST, "train", "train_entry")


@pytest.fixture(scope="module")
def sec(tmp_path_factory):
    return run_distributed(world_security, 1, str(tmp_path_factory.mktemp("security")),
                           timeout=900)[0]


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_every_file_type_is_covered(sec):
    files = sec["files"]
    assert "rank_00000.safetensors" in files["megatron"] and "state/common.pt" in files["megatron"]
    assert "state/.metadata" in files["megatron"]
    assert any(f.startswith("deepspeed/state/zero_pp_rank_0") for f in files["deepspeed"])
    assert not any(f.endswith(".pt") and not f.startswith(("state/", "deepspeed/"))
                   for f in files["megatron"] + files["deepspeed"])  # no pickled rank files
    assert set(sec["cases"]) == {(kind, c) for kind in PLANTS for c in COMMANDS}


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_planted_payload_never_runs(sec, kind):
    for command in COMMANDS:
        case = sec["cases"][(kind, command)]
        assert not case["ran"], f"{kind}: the payload ran under {command}"
        reads_file = not (kind.startswith("deepspeed") and command in POST)
        if reads_file:
            lines = _errors(case["err"])
            assert case["code"] == 2 and len(lines) == 1, (kind, command, case["err"][-2000:])
            assert case["names"] in lines[0], (kind, command, lines)
        else:  # the post commands never read DeepSpeed's optimizer files: they load safely
            assert case["code"] == 0, (kind, command, case["err"][-2000:])


def test_the_payloads_are_live(sec):
    # Without the checks (trusted), each payload runs where a loader unpickles it; the
    # per-rank file is never unpickled, trusted or not.
    assert sec["controls"] == {kind: kind != "rank_state" for kind in PLANTS}


def test_pickles_are_refused_by_name(sec):
    line = _errors(sec["cases"][("dcp_metadata", "eval")]["err"])[0]
    assert "posix.system" in line and "--trust-checkpoint" in line
    line = _errors(sec["cases"][("deepspeed_optimizer", "train_entry")]["err"])[0]
    assert "posix.system" in line
    line = _errors(sec["cases"][("rank_state", "ablate")]["err"])[0]
    assert "not a per-rank state file" in line


def test_format_1_needs_trust_and_then_upgrades(sec):
    legacy = sec["legacy"]
    for command in COMMANDS:
        case = legacy[command]
        lines = _errors(case["err"])
        assert not case["ran"] and case["code"] == 2 and len(lines) == 1, (command, case["err"])
        assert "format-1 checkpoint" in lines[0] and "--trust-checkpoint" in lines[0]
    code, err = legacy["trusted_ablate"]
    assert code == 0, err
    assert legacy["trusted_ablate_format"] == 2
    code, printed = legacy["trusted_cli"]  # sgtm train's flag reaches the torchrun entry
    assert code == 0 and "checkpoint.trust_pickle=true" in printed, printed
    code, err = legacy["trusted_resume"]
    assert code == 0, err
    assert legacy["resumed_format"] == 2


@pytest.mark.parametrize("damage,message", [
    ("flipped", "state/__0_1.distcp: sha256"),
    ("missing", "state/__0_1.distcp: missing"),
    ("added", "state/extra.pt: not recorded"),
])
def test_checksum_damage_is_one_error_and_nothing_changes(sec, damage, message):
    result = sec["integrity"][damage]
    for command, (code, err) in result["runs"].items():
        lines = _errors(err)
        assert code == 2 and len(lines) == 1 and message in lines[0], (command, err[-2000:])
        assert "integrity check failed" in lines[0]
    assert result["untouched"]


def test_hf_export_runs_eval_attack_rmu_without_any_unpickling(sec):
    assert sec["export"][0] == 0, sec["export"][1]
    assert "sgtm_export.json" in sec["hf_files"] and "model.safetensors" in sec["hf_files"]
    for name in ("hf_eval", "hf_attack", "hf_rmu"):
        assert sec[name][0] == 0, (name, sec[name][1][-3000:])
    assert sec["pickle_calls"] == []
    # The export evaluates like the checkpoint it came from (ablated, calibrated alike).
    ours = {(r["split"], r["calibrated"]): r["loss"] for r in sec["ck_eval_rows"]}
    theirs = {(r["split"], r["calibrated"]): r["loss"] for r in sec["hf_eval_rows"]}
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for key, loss in ours.items():
        assert abs(loss - theirs[key]) < 1e-4, (key, loss, theirs[key])
    assert sec["hf_attack_rows"] and sec["hf_attack_rows"][0]["curve"]
    code, err = sec["hf_tampered"]
    lines = _errors(err)
    assert code == 2 and len(lines) == 1 and "model.safetensors: sha256" in lines[0], err
