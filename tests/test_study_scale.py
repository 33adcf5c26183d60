"""Studies beyond one CPU process: the paper-scale GPU specs listed and smoke-run on CPU
(a few capped steps of their real sizes), micro-batch accumulation in the in-process trainer,
and sizes with ``gpus > 1`` trained by `sgtm train` under torchrun, then evaluated as usual."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_sgtm.configbase import ConfigError
from megatron_sgtm.study.cli import main
from megatron_sgtm.study.executors import array_ranges, slurm_groups
from megatron_sgtm.study.spec import expand, load_spec

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "configs" / "studies"
SMALL_DATA = ("data_overrides=[max_docs=600, split.max_test_docs=40, tokenizer.vocab_size=512, "
              "tokenizer.max_train_bytes=300000]")
# A few capped steps of the spec's own sizes, with evaluation cut to a handful of sequences.
SMOKE = [SMALL_DATA, "train.max_steps=2", "train.seq_length=32", "train.batch_size=4",
         "train.micro_batch_size=2", "train.threads=1", "eval.max_sequences=8",
         "eval.calibration_steps=2", "eval.generation_prompts=2", "eval.generation_tokens=4",
         "attack.steps=2", "attack.warmup_steps=0", "attack.eval_every=1", "attack.eval_sequences=8"]


def _listed(capsys) -> list[str]:
    return [line.split()[1] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name, count, first, pick, steps, blocks", [
    # 4 sizes x (no_filter + 3 labelled methods x 10 rates) + 8 leakage baselines; the 8M
    # size's blocks: 6 layers of d128 (its 8M counts the paper's GPT-Neo vocabulary).
    ("bilingual-noise", 132, "8M-160M-no_filter-una-s0", "8M-160M-sgtm-u0.1-s0", 33120, 6 * 128),
    # 4 sizes x (no_filter + 3 labelled methods x 1 rate) + 6 leakage baselines; 34M: 8 x d384.
    ("topic", 22, "34M-680M-no_filter-una-s0", "34M-680M-sgtm-u0.2-s0", 9689, 8 * 384),
])
def test_paper_spec_lists_and_smoke_runs_on_cpu(name, count, first, pick, steps, blocks, tmp_path,
                                                capsys, monkeypatch):
    spec_path = STUDIES / f"{name}.yaml"
    spec = load_spec(spec_path)
    # The paper's budget at the largest size (SGTM.md section 8): steps x batch x context.
    big = spec.sizes[-1]
    assert spec.train.steps_for(big.tokens[0]) == steps
    assert {s.gpus for s in spec.sizes} == {1}  # every paper size: one GPU per run
    out = tmp_path / "study"
    monkeypatch.chdir(tmp_path)  # paths in the spec resolve without the repo as cwd
    assert main([str(spec_path), SMALL_DATA, "--out", str(out), "--list"]) == 0
    ids = _listed(capsys)
    assert len(ids) == count and ids[0] == first
    assert main([str(spec_path), *SMOKE, "--out", str(out), "--task-index",
                 str(ids.index(pick))]) == 0
    row = json.loads((out / "runs" / pick / "result.json").read_text())
    assert row["status"] == "done" and row["steps"] == 2 and row["tokens_trained"] == 2 * 4 * 32
    # The real size was built: about 12 d^2 parameters per layer (layers x d = blocks).
    d = blocks // spec.sizes[0].num_layers
    assert row["non_embedding_params"] == pytest.approx(12 * d * blocks, rel=0.02)
    assert all(row[f"{s}_loss"] > 0 for s in ("retain", "forget"))


def _micro(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: scale\nrecipe: {ROOT / 'configs/data/bilingual.yaml'}\n"
        "data_overrides: [max_docs=600, split.max_test_docs=40, tokenizer.vocab_size=800, "
        "tokenizer.max_train_bytes=400000]\n"
        "methods: [sgtm]\nundiscovered_rates: [0.1]\ntoken_budgets: [8192]\n"
        "eval: {max_sequences: 16, calibration_steps: 4, generation_prompts: 2, generation_tokens: 4}\n"
        + text)
    return path


S16 = "sizes: [{name: s16, num_layers: 1, hidden_size: 16, num_attention_heads: 2, " \
      "ffn_hidden_size: 64, forget_mlp_units: 8%s}]\n"


# Four heads, two of them forget heads: one forget head per rank at TP 2.
S4H = "sizes: [{name: s16, num_layers: 1, hidden_size: 16, num_attention_heads: 4, " \
      "ffn_hidden_size: 64, forget_heads: 2, forget_mlp_units: 8%s}]\n"


def test_micro_batches_accumulate_to_the_same_step(tmp_path):
    """16 sequences per step as one micro-batch or as four of 4: the same training."""
    outs = []
    for micro in ("null", "4"):
        spec = _micro(tmp_path, S16 % "" + f"train: {{seq_length: 32, batch_size: 16, lr: 0.005, "
                                           f"curve_points: 4, micro_batch_size: {micro}}}\n")
        out = tmp_path / f"m{micro}"
        if outs:  # the same prepared shards
            shutil.copytree(outs[0] / "data", out / "data")
        assert main([str(spec), "--out", str(out)]) == 0
        outs.append(out)
    (run,) = [p.name for p in (outs[0] / "runs").iterdir()]
    curves = [json.loads((o / "runs" / run / "train.json").read_text())["curve"] for o in outs]
    assert [p["step"] for p in curves[0]] == [p["step"] for p in curves[1]]
    for a, b in zip(*curves):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
    models = [torch.load(o / "runs" / run / "model.pt", weights_only=True) for o in outs]
    # float32 sums in another order; AdamW divides each gradient by its own running scale, so a
    # weight whose gradient is nearly zero (a rare token's embedding row) can move by a visible
    # share of one step (lr 0.005) from rounding alone. Bound that, and require it to be rare.
    for key in models[0]:
        a, b = models[0][key], models[1][key]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert ((a - b).abs() > 1e-5).float().mean() < 1e-3, key


@pytest.mark.slow
def test_size_with_two_gpus_trains_under_torchrun_then_evaluates(tmp_path):
    spec = _micro(tmp_path, S4H % ", gpus: 2, tensor_parallel: 2"
                  + "train: {seq_length: 32, batch_size: 8, lr: 0.005, curve_points: 4}\n")
    out = tmp_path / "study"
    assert main([str(spec), "--out", str(out)]) == 0
    (rdir,) = list((out / "runs").iterdir())
    cfg = json.loads((rdir / "train_config.json").read_text())
    assert (cfg["tensor_parallel"], cfg["data"]["method"], cfg["train"]["steps"]) == (2, "sgtm", 32)
    info = json.loads((rdir / "train.json").read_text())
    assert (info["trainer"], info["gpus"], info["steps"]) == ("sgtm train", 2, 32)
    assert info["forget_tokens_seen"] > info["undiscovered_tokens_seen"] > 0
    assert "resumed" not in (rdir / "train.log").read_text()
    row = json.loads((rdir / "result.json").read_text())
    assert row["status"] == "done" and row["tokens_trained"] == 32 * 8 * 32
    # Trained, then ablated for evaluation: better than the untrained model's ln(vocab) on retain.
    assert row["retain_loss"] < 6.5 and row["forget_loss"] > row["retain_loss"]
    assert len(info["curve"]) >= 4 and info["curve"][-1]["train_loss"] < info["curve"][0]["train_loss"]
    # A re-run reuses the finished run; the SLURM executor gives two-GPU sizes their own array.
    assert main([str(spec), "--out", str(out)]) == 0
    runs = expand(load_spec(spec), 800)
    assert slurm_groups(load_spec(spec), runs) == [(2, [0])]


def test_slurm_arrays_group_runs_by_gpus_per_run(tmp_path):
    spec = load_spec(_micro(tmp_path, "sizes:\n"
                            "  - {name: a, num_layers: 1, hidden_size: 16, num_attention_heads: 2, "
                            "ffn_hidden_size: 64, forget_mlp_units: 8}\n"
                            "  - {name: b, num_layers: 1, hidden_size: 16, num_attention_heads: 4, "
                            "ffn_hidden_size: 64, forget_heads: 2, forget_mlp_units: 8, gpus: 4, "
                            "tensor_parallel: 2}\n"
                            "methods: [no_filter, sgtm]\n"))
    runs = expand(spec, 800)
    assert [r.run_id for r in runs] == ["a-8192-no_filter-una-s0", "a-8192-sgtm-u0.1-s0",
                                        "b-8192-no_filter-una-s0", "b-8192-sgtm-u0.1-s0"]
    assert slurm_groups(spec, runs) == [(1, [0, 1]), (4, [2, 3])]
    assert array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and array_ranges([3]) == "3"


@pytest.mark.parametrize("text, key", [
    (S16 % ", gpus: 3, tensor_parallel: 2", "sizes[0].gpus 3 must be a positive multiple"),
    (S16 % ", gpus: 2" + "train: {batch_size: 9}\n", "train.batch_size 9 is not a multiple"),
    (S16 % ", gpus: 2" + "leakage: {forget_shares: [0, 1]}\n", "leakage: the baseline series"),
    (S16 % "" + "train: {batch_size: 16, micro_batch_size: 5}\n", "train.micro_batch_size 5"),
    (S16 % "" + "train: {max_steps: 0}\n", "train.max_steps"),
    (S16 % ", gpus: 2, tensor_parallel: 2", "sizes[0].tensor_parallel 2 (size s16): 1 forget"),
])
def test_bad_scale_settings_are_one_error_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_spec(_micro(tmp_path, text))
    (problem,) = err.value.problems
    assert problem.startswith(key), problem
