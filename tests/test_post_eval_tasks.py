"""`sgtm eval-tasks` on a real prep output: task files lm-eval indexes, items that fit the
token budget, a multiple-choice design where ignoring the context scores exactly chance,
determinism and one-line errors; and `sgtm eval --lm-eval` without the extra."""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from data_prep.cli import main as prep_main
from megatron_sgtm.cli import main as sgtm

ROOT = Path(__file__).resolve().parents[1]
PREP = ["max_docs=400", "split.max_test_docs=40", "tokenizer.kind=bpe", "tokenizer.vocab_size=800",
        "tokenizer.max_train_bytes=250000", "--no-progress", "--workers", "2"]
# Sentences of an 800-piece vocabulary are long in tokens: budgets for that (the defaults, 40 + 24,
# fit the demo's 64-token models).
BUDGET = ["--context-tokens", "48", "--choice-max-tokens", "40"]
NAMES = ["sgtm_forget_mc", "sgtm_forget_cloze", "sgtm_retain_mc", "sgtm_retain_cloze"]


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tasks")
    assert prep_main(["--recipe", str(ROOT / "configs/data/bilingual.yaml"),
                      "--out", str(root / "shards"), *PREP]) == 0
    assert sgtm(["eval-tasks", "--data", str(root / "shards"), "--out", str(root / "tasks"),
                 *BUDGET]) == 0
    return root


def _items(root: Path, name: str) -> list[dict]:
    return [json.loads(l) for l in (root / "tasks" / f"{name}.jsonl").read_text().splitlines()]


def test_lm_eval_indexes_every_task_and_the_group(tasks):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks / "tasks"), include_defaults=False)
    assert set(NAMES + ["sgtm"]) <= set(manager.all_tasks)
    loaded = manager.load(["sgtm_forget_mc"])["tasks"]["sgtm_forget_mc"]
    doc = next(iter(loaded.test_docs()))
    assert loaded.doc_to_choice(doc) == doc["choices"] and loaded.doc_to_target(doc) == doc["label"]
    summary = json.loads((tasks / "tasks" / "tasks.json").read_text())
    assert {n: summary["tasks"][n]["items"] for n in NAMES} == {
        n: len(_items(tasks, n)) for n in NAMES}


def test_items_fit_the_token_budget_and_are_well_formed(tasks):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tasks / "shards" / "tokenizer.model"))
    for split in ("forget", "retain"):
        mc = _items(tasks, f"sgtm_{split}_mc")
        assert len(mc) >= 8 and len(mc) % 4 == 0
        for item in mc:
            assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
            assert len(sp.encode(item["context"])) <= 48
            assert all(4 <= len(sp.encode(c)) <= 40 for c in item["choices"])
        for item in _items(tasks, f"sgtm_{split}_cloze"):
            word = item["target"].strip()
            assert item["target"] == " " + word and len(word) >= 5
            assert re.search(rf"\b{re.escape(word)}\b", item["context"])  # recoverable from it
            assert len(sp.encode(item["context"])) <= 48


@pytest.mark.parametrize("split", ["forget", "retain"])
def test_a_scorer_that_ignores_the_context_scores_exactly_chance(tasks, split):
    """Every sentence is the answer of one item and a distractor in three others."""
    mc = _items(tasks, f"sgtm_{split}_mc")
    preference = lambda s: hashlib.sha256(s.encode()).hexdigest()  # noqa: E731  (no ties)
    right = sum(max(range(4), key=lambda k: preference(i["choices"][k])) == i["label"] for i in mc)
    assert right * 4 == len(mc)


def test_same_input_same_files_and_force_replaces(tasks, tmp_path, capsys):
    again = tmp_path / "again"
    assert sgtm(["eval-tasks", "--data", str(tasks / "shards"), "--out", str(again), *BUDGET]) == 0
    for name in NAMES:
        assert (again / f"{name}.jsonl").read_bytes() == (tasks / "tasks" / f"{name}.jsonl").read_bytes()
    assert sgtm(["eval-tasks", "--data", str(tasks / "shards"), "--out", str(again)]) == 2
    assert len(_errors(capsys)) == 1
    assert sgtm(["eval-tasks", "--data", str(tasks / "shards"), "--out", str(again), "--force",
                 "--max-items", "8"]) == 0
    assert len((again / "sgtm_forget_mc.jsonl").read_text().splitlines()) == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize("args,message", [
    (["--data", "{missing}"], "manifest.json: missing"),
    (["--choices", "1"], "choices: need at least 2"),
    (["--prefix", "9bad"], "prefix"),
])
def test_bad_input_gives_one_error(tasks, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "nothing") for a in args]
    base = {"--data": str(tasks / "shards"), "--out": str(tmp_path / "out")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    assert sgtm(["eval-tasks", *[x for kv in base.items() for x in kv]]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_a_directory_not_written_by_eval_tasks_is_never_replaced(tasks, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert sgtm(["eval-tasks", "--data", str(tasks / "shards"), "--out", str(tmp_path / "mine"),
                 "--force"]) == 2
    assert "not a task directory" in _errors(capsys)[0]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_lm_eval_without_the_extra_names_the_extra(tasks, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if `.[eval]` was not installed
    assert sgtm(["eval", str(tasks / "no_checkpoint_needed"), "--lm-eval", "sgtm_forget_mc"]) == 2
    (error,) = _errors(capsys)
    assert "optional extra 'eval'" in error and "pip install -e '.[eval]'" in error
