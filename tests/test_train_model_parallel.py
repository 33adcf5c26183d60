"""`sgtm train` at TP=2 x PP=2 with sequence parallelism, end to end (4 processes, CPU):
killed with SIGKILL and resumed, it ends bit-exact with an uninterrupted run; its checkpoint
ablates and evaluates at TP=1 without a pipeline; bad layouts are refused before any rank
starts."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _workers_train import losses
from megatron_sgtm.data.testing import write_sample_shards
from megatron_sgtm.train import cli
from test_train_resume import TINY, finish, logged_step

STEPS = 6
LAYOUT = ["tensor_parallel=2", "pipeline_parallel=2", "sequence_parallel=true"]


def overrides(shards, ck, run_dir, *extra):
    # Global batch 8 of micro-batches of 2 at DP=1: four micro-batches per step, whose label
    # mixes differ (the sample shards hold forget, retain-path and unlabeled documents).
    return [f"data.dir={shards}", f"checkpoint.dir={ck}", f"logging.run_dir={run_dir}",
            f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_every=1",
            "checkpoint.save_every=1", "checkpoint.keep_last=2", "train.micro_batch_size=2",
            "train.global_batch_size=8", "data.eval_batches=2", "logging.progress_bar=false",
            "logging.wandb=off", *LAYOUT, *extra]


def final_state(ck: Path) -> dict:
    """Every tensor of the final checkpoint, by global key (layout-independent)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ck / "final.pt"
    dcp_to_torch_save(str(ck / f"step_{STEPS:08d}" / "state"), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def launch(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           "-m", "megatron_sgtm.train", "--config", TINY, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def sgtm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from megatron_sgtm.cli import main; "
                           "sys.exit(main())", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_sample_shards(path, n_train=120, n_test=12)
    return path


@pytest.mark.slow
def test_tp2_pp2_sp_resumes_bit_exact_and_post_tools_read_it(shards, tmp_path, capsys):
    ref_ck, ref_run = tmp_path / "ref_ck", tmp_path / "ref_run"
    code = cli.main(["--config", TINY, "--nproc", "4", *overrides(shards, ref_ck, ref_run)])
    assert code == 0, capsys.readouterr()
    ref_losses = losses(str(ref_run))
    assert len(ref_losses) == STEPS and all(v == v for v in ref_losses)

    kill_at = random.randint(2, STEPS - 2)
    ck, run_dir = tmp_path / "ck", tmp_path / "run"
    proc = launch(overrides(shards, ck, run_dir))
    deadline = time.time() + 300
    while logged_step(run_dir) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before the kill at step {kill_at}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    code, out = finish(launch(overrides(shards, ck, run_dir)), timeout=300)
    assert code == 0 and "resumed from step" in out, out[-3000:]
    assert losses(str(run_dir)) == ref_losses, f"killed at step {kill_at}"
    ref, got = final_state(ref_ck), final_state(ck)
    assert ref.keys() == got.keys() and any(k.startswith("optimizer.") for k in ref)
    assert not [k for k in ref if not torch.equal(ref[k], got[k])], f"killed at {kill_at}"
    meta = json.loads((ck / f"step_{STEPS:08d}" / "sgtm_meta.json").read_text())
    assert (meta["tensor_parallel"], meta["pipeline_parallel"]) == (2, 2)

    # The TP=2 x PP=2 checkpoint, read at TP=1 without a pipeline.
    ablated = tmp_path / "ablated"
    done = sgtm("ablate", ck, "--out", ablated)
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "eval.jsonl"
    done = sgtm("eval", ablated, "--data", shards, "--calibration-steps", "5", "--out", results)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["split"] for r in rows} >= {"forget", "retain"}
    assert all(0 < r["loss"] < 20 for r in rows)


@pytest.mark.parametrize("extra,message", [
    (["pipeline_parallel=3"], "pipeline_parallel 3 exceeds model.num_layers 2"),
    (["pipeline_parallel=2", "model.num_layers=3"], "not divisible by pipeline_parallel 2"),
    (["sequence_parallel=true"], "sequence_parallel needs tensor_parallel > 1"),
    (["sequence_parallel=true", "tensor_parallel=2", "model.seq_length=63"],
     "seq_length 63 is not divisible by tensor_parallel 2"),
    (["engine.name=deepspeed", "pipeline_parallel=2"], "deepspeed supports data x tensor"),
    (["pipeline_parallel=2", "virtual_pipeline_parallel=2", "model.num_layers=4"],
     "multiple of pipeline_parallel"),
])
def test_bad_layouts_fail_before_any_rank_starts(shards, tmp_path, capsys, extra, message):
    args = ["--config", TINY, "--nproc", "2", f"data.dir={shards}",
            f"checkpoint.dir={tmp_path / 'ck'}", "train.micro_batch_size=2",
            "train.global_batch_size=6", *extra]
    code = cli.main(args)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in captured.err, captured.err
    assert "+ " not in captured.out  # torchrun never started
    assert not (tmp_path / "ck").exists()
