"""CLI conventions shared by every subcommand that takes ``key=value`` overrides: flags and
overrides in any order, ``--print-config`` (the resolved config, loadable back), and
``sgtm --version``."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from data_prep import cli as prep_cli
from data_prep.recipe import load_recipe
from megatron_sgtm import cli as sgtm_cli
from megatron_sgtm import plan_cli
from megatron_sgtm.study import cli as study_cli
from megatron_sgtm.study.spec import load_spec
from megatron_sgtm.train import cli as train_cli
from megatron_sgtm.train import run as train_run
from megatron_sgtm.train.config import load_experiment
from megatron_sgtm.version import version_string

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "configs/train/tiny_cpu.yaml")
PLAN = str(ROOT / "configs/train/8b_h100x16.yaml")
RECIPE = str(ROOT / "configs/data/bilingual.yaml")
STUDY = str(ROOT / "configs/studies/cpu-mini.yaml")

# Per command: its parser, its flags (each a group of words that stay together) and its
# positionals (the config path first where it is positional, then two overrides). The parsed
# result must not depend on where the flags stand among the positionals.
CASES = {
    "train": (train_cli._parser, [["--config", TRAIN], ["--nproc", "2"], ["--tp", "2"]],
              ["train.steps=1", "data.dir=D"]),
    "torchrun entry": (lambda: _entry_parser(), [["--config", TRAIN]],
                       ["train.steps=1", "data.dir=D"]),
    "prep": (prep_cli.build_parser, [["--recipe", RECIPE], ["--out", "OUT"], ["--workers", "1"]],
             ["max_docs=50", "tokenizer.vocab_size=512"]),
    "plan": (plan_cli._parser, [["--gpus", "16"], ["--json"], ["--gpu-memory", "40"]],
             [PLAN, "tensor_parallel=4", "train.micro_batch_size=2"]),
    "study": (study_cli.build_parser, [["--workers", "2"], ["--out", "OUT"], ["--list"]],
              [STUDY, "seeds=[0]", "train.threads=1"]),
}


def _entry_parser():
    """``python -m megatron_sgtm.train``'s parser, through its own parse function."""

    class _Adapter:
        @staticmethod
        def parse_intermixed_args(argv):
            return train_run.parse_args(argv)

    return _Adapter()


def _orders(flags: list[list[str]], positionals: list[str]):
    """Every order of the flag groups, each spread over every choice of slots before, between
    and after the positionals (the issue's example is one of them)."""
    slots = len(positionals) + 1
    for perm in itertools.permutations(flags):
        for places in itertools.product(range(slots), repeat=len(perm)):
            argv = []
            for slot in range(slots):
                for group, place in zip(perm, places):
                    if place == slot:
                        argv += group
                if slot < len(positionals):
                    argv.append(positionals[slot])
            yield argv


@pytest.mark.parametrize("command", sorted(CASES))
def test_flags_and_overrides_in_any_order_parse_alike(command):
    make, flags, positionals = CASES[command]
    parsed = [vars(make().parse_intermixed_args(argv)) for argv in _orders(flags, positionals)]
    assert len(parsed) >= len(positionals) + 1
    # The overrides in the order given, no flag's value among them.
    assert parsed[0]["overrides"] == [p for p in positionals if "=" in p]
    for other in parsed[1:]:
        assert other == parsed[0]


def test_the_issue_example_order_reaches_the_config(capsys):
    code = train_cli.main(["--config", TRAIN, "train.steps=1", "--nproc", "1",
                           "data.dir=D", "--print-config"])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "steps: 1\n" in text and "dir: D\n" in text


def test_a_flag_value_with_an_equals_sign_stays_the_flags():
    args = prep_cli.build_parser().parse_intermixed_args(
        ["--recipe", RECIPE, "max_docs=5", "--out", "runs/lr=3e-4", "seed=1"])
    assert args.out == "runs/lr=3e-4" and args.overrides == ["max_docs=5", "seed=1"]
    args = train_cli._parser().parse_intermixed_args(["--config", "a=b.yaml", "x=1"])
    assert args.config == "a=b.yaml" and args.overrides == ["x=1"]


def _printed(capsys, main, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_train_print_config_loads_back_to_the_same_config(capsys, tmp_path):
    overrides = ["train.steps=7", "train.lr=3e-4", "logging.wandb=off"]
    text = _printed(capsys, train_cli.main,
                    ["--config", TRAIN, overrides[0], "--print-config", *overrides[1:], "--tp", "1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    expected = load_experiment(TRAIN, overrides + ["tensor_parallel=1"])
    assert load_experiment(path) == expected
    assert expected.train.steps == 7 and expected.logging.wandb == "off"


def test_plan_print_config_loads_back(capsys, tmp_path):
    text = _printed(capsys, plan_cli.main, [PLAN, "--print-config", "tensor_parallel=4",
                                            "--gpus", "16", "train.micro_batch_size=2"])
    (tmp_path / "p.yaml").write_text(text)
    assert load_experiment(tmp_path / "p.yaml") == load_experiment(
        PLAN, ["tensor_parallel=4", "train.micro_batch_size=2"])


def test_prep_print_config_loads_back_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "never"
    text = _printed(capsys, prep_cli.main, ["--recipe", RECIPE, "max_docs=50", "--print-config",
                                            "--out", str(out), "noise.undiscovered_rate=0.2"])
    (tmp_path / "r.yaml").write_text(text)
    assert load_recipe(tmp_path / "r.yaml") == load_recipe(
        RECIPE, ["max_docs=50", "noise.undiscovered_rate=0.2"])
    assert not out.exists()


def test_study_print_config_loads_back(capsys, tmp_path):
    text = _printed(capsys, study_cli.main, [STUDY, "--print-config", "seeds=[3]"])
    (tmp_path / "s.yaml").write_text(text)
    spec = load_spec(tmp_path / "s.yaml")
    assert spec == load_spec(STUDY, ["seeds=[3]"]) and spec.seeds == [3]


@pytest.mark.parametrize("main,argv", [
    (train_cli.main, ["--config", TRAIN]),
    (plan_cli.main, [PLAN]),
])
def test_print_config_refuses_bad_keys_with_the_runs_one_error(capsys, main, argv):
    assert main([*argv, "train.stpes=3", "--dry-run" if main is train_cli.main else "--json"]) == 2
    run_err = capsys.readouterr().err
    assert main([*argv, "train.stpes=3", "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == run_err
    assert len([l for l in err.splitlines() if l.startswith("error:")]) == 1
    assert "train.stpes: unknown key" in err


def test_print_config_checks_the_layout_against_the_world(capsys):
    assert train_cli.main(["--config", TRAIN, "--nproc", "3", "tensor_parallel=2",
                           "--print-config"]) == 2
    assert "not divisible by tensor_parallel 2" in capsys.readouterr().err


def test_prep_print_config_refuses_bad_recipe_keys(capsys):
    assert prep_cli.main(["--recipe", RECIPE, "--print-config", "classifer.kind=topic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "classifer" in err


def test_version_names_the_package_and_the_commit(capsys):
    assert sgtm_cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"megatron_sgtm {version_string()}"
    # Run from this checkout: the commit is part of it (12 hex digits, maybe .dirty).
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"\d+\.\d+\.\d+\+g[0-9a-f]{12}(\.dirty)?", version_string()), out
