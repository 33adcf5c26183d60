"""`sgtm eval --lm-eval` end to end at the demo's scale: the embedded bilingual corpus prepped,
a no-filter and an SGTM model trained by the torchrun entry, exported, and evaluated by
lm-evaluation-harness on the local tasks of `sgtm eval-tasks`.

What is asserted: the HF export's logits and lm-eval's per-choice log-likelihoods equal our
megatron model's; the tokenizer and model configs carry EOS/pad; lm-eval reports accuracies;
SGTM's ablation raises the forget cloze perplexity, by a larger factor than the retain one.
What is only reported (printed with -s): the multiple-choice accuracies of the two models. At
this scale (loss ~5.6 nats, 64-token context, 92 forget items) no-filter measured 0.272 and
ablated SGTM 0.207, about one standard error apart: not a direction a test can assert.

Costs about 2.5 minutes on 2 cores (two 480-step trainings side by side, four lm-eval runs,
two builds of lm-eval's 15k-task index), plus ~20 s for the one-run study of the last test.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _workers_lm_eval import LIMIT, train_both, world_llama_pruned, world_lm_eval
from data_prep.cli import main as prep_main
from distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    data = tmp / "shards"
    # The demo's recipe and data, whole (sgtm demo preps exactly this).
    assert prep_main(["--recipe", str(ROOT / "configs/data/bilingual.yaml"), "--out", str(data),
                      "--no-progress", "--workers", "2"]) == 0
    ckpts = train_both(tmp, data)
    out = run_distributed(world_lm_eval, 1, str(tmp), str(data),
                          {k: str(v) for k, v in ckpts.items()}, timeout=900)[0]
    out["llama"] = run_distributed(world_llama_pruned, 1, str(tmp), str(data))[0]
    out["manifest"] = json.loads((data / "manifest.json").read_text())
    return out


def _errors(result) -> list[str]:
    return [line for line in result[2].splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("name", ["no_filter", "sgtm"])
def test_hf_export_computes_what_our_model_computes(runs, name):
    r = runs[name]
    assert r["cli"][0] == 0, r["cli"][2][-3000:]
    assert r["provenance"]["ablated"] is (name == "sgtm")
    assert r["logit_diff"] < 1e-4 * max(1.0, r["logit_scale"]), r["logit_diff"]
    assert r["ll_pairs"] == 160 and r["ll_diff"] < 1e-3, r["ll_diff"]
    tok = runs["manifest"]["tokenizer"]
    assert r["eos"] == (tok["eod_id"], tok["pad_id"], tok["eod_id"], tok["pad_id"])


@pytest.mark.parametrize("name", ["no_filter", "sgtm"])
def test_simple_evaluate_reports_accuracy_per_task(runs, name):
    r = runs[name]
    printed = r["cli"][1]
    for task in ("sgtm_forget_mc", "sgtm_retain_mc", "sgtm_forget_cloze", "sgtm_retain_cloze"):
        metrics = r["results"][task]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and metrics["acc_stderr,none"] >= 0.0
        assert 0 < r["n"][task]["effective"] <= LIMIT
        assert sum(line.startswith(f"lm-eval {task}: acc ") for line in printed.splitlines()) == 1
        row = next(x for x in r["rows"] if x.get("lm_eval_task") == task)
        assert row["metrics"]["acc"] == metrics["acc,none"] and row["n"] == r["n"][task]["effective"]
    assert "acc_norm,none" in r["results"]["sgtm_forget_mc"]
    print(f"\n{name}: " + ", ".join(
        f"{t} acc {r['results'][t]['acc,none']:.3f}±{r['results'][t]['acc_stderr,none']:.3f}"
        for t in ("sgtm_forget_mc", "sgtm_retain_mc")))


def test_ablation_removes_forget_domain_likelihood_selectively(runs):
    """The robust direction at this scale: the forget split's cloze words lose far more
    likelihood under SGTM's ablation than the retain split's."""
    ppl = {n: {s: runs[n]["results"][f"sgtm_{s}_cloze"]["perplexity,none"]
               for s in ("forget", "retain")} for n in ("no_filter", "sgtm")}
    forget_ratio = ppl["sgtm"]["forget"] / ppl["no_filter"]["forget"]
    retain_ratio = ppl["sgtm"]["retain"] / ppl["no_filter"]["retain"]
    print(f"\ncloze perplexity sgtm/no-filter: forget {forget_ratio:.2f}x, retain {retain_ratio:.2f}x")
    assert forget_ratio > 1.0 and forget_ratio > retain_ratio


def test_a_second_run_reuses_the_export_and_an_export_dir_is_accepted(runs):
    """The second run also computes `sgtm eval`'s own losses in the same call."""
    code, printed, err = runs["again"]
    assert code == 0, err[-2000:]
    assert "(reused; uncalibrated)" in printed and runs["again_unchanged"]
    rows = runs["again_rows"]  # our losses and lm-eval's accuracy, one file
    assert {r["split"] for r in rows if "split" in r} == {"forget", "retain"}
    assert [r["lm_eval_task"] for r in rows if "lm_eval_task" in r] == ["sgtm_forget_mc"]
    code, printed, err = runs["given"]
    assert code == 0, err[-2000:]
    assert "(given; uncalibrated)" in printed and "lm-eval sgtm_retain_mc: acc" in printed


def test_unknown_task_missing_tokenizer_and_offline_hub_task_give_one_error(runs):
    for case, message in (("unknown", "unknown lm-eval task 'sgtm_forget_mcq' (did you mean "
                                      "sgtm_forget_mc"),
                          ("notok", "its tokenizer is missing"),
                          ("hub", "could not load a task's dataset")):
        code, _, err = runs[case]
        errors = _errors(runs[case])
        assert code == 2 and len(errors) == 1 and message in errors[0], err[-2000:]
    assert runs["relative_tokenizer"]
    # The hub task name reached lm-eval unchanged: it tried wmdp_bio's dataset.
    assert "cais/wmdp" in _errors(runs["hub"])[0]


def test_pruned_llama_export_with_tokenizer(runs):
    r = runs["llama"]
    tok = runs["manifest"]["tokenizer"]
    assert r["arch"] == "LlamaForCausalLM" and r["ffn"] == 112  # 16 forget MLP units pruned
    assert r["logit_diff"] < 1e-4 and r["ids_equal"]
    assert r["eos_pad"] == (tok["eod_id"], tok["pad_id"])


def test_study_option_adds_lm_eval_metrics_to_each_run(tmp_path, monkeypatch):
    """`eval.lm_eval_tasks` in a study spec: local tasks built once, every run exported and
    scored by lm-eval; an unknown name stops the study before any training."""
    from megatron_sgtm.study.cli import main as study

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: lm-eval-option\nrecipe: " + str(ROOT / "configs/data/bilingual.yaml") + "\n"
        "data_overrides: [max_docs=1000, split.max_test_docs=100,\n"
        "                 tokenizer.max_train_bytes=400000]\n"
        "sizes: [{name: s16, num_layers: 1, hidden_size: 16, num_attention_heads: 2,\n"
        "         ffn_hidden_size: 64, forget_mlp_units: 8}]\n"
        "token_budgets: [8192]\nmethods: [sgtm]\nundiscovered_rates: [0.1]\n"
        "train: {seq_length: 32, batch_size: 16, lr: 0.005, curve_points: 2}\n"
        "eval: {max_sequences: 16, calibration_steps: 5, generation_prompts: 0,\n"
        "       lm_eval_tasks: [sgtm_forget_mc, sgtm_retain_cloze], lm_eval_limit: 8}\n")
    assert study([str(spec), "eval.lm_eval_tasks=[sgtm_forget_mcq]",
                  "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad" / "runs").exists()
    assert study([str(spec), "--out", str(tmp_path / "study")]) == 0
    (result,) = (tmp_path / "study" / "runs").glob("*/result.json")
    row = json.loads(result.read_text())
    assert 0.0 <= row["lm_eval/sgtm_forget_mc/acc"] <= 1.0
    assert row["lm_eval/sgtm_retain_cloze/perplexity"] > 1.0
    assert (result.parent / "hf" / "tokenizer.json").is_file()
    assert json.loads((result.parent / "lm_eval.json").read_text())["n-samples"][
        "sgtm_forget_mc"]["effective"] == 8
