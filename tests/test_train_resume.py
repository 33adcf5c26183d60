"""Exact resume and failure handling of the real entry point (torchrun, 2 processes, CPU).

A run is killed with SIGKILL at a random step, resumed from its last checkpoint and finished;
its final weights and optimizer state equal an uninterrupted run's bit for bit. A checkpoint of
another partition and a diverging run are refused without touching the checkpoints.
"""
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

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")
STEPS = 8


def overrides(shards, ck, run_dir, *extra):
    return [f"data.dir={shards}", f"checkpoint.dir={ck}", f"logging.run_dir={run_dir}",
            f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_every=1",
            "checkpoint.save_every=1", "checkpoint.keep_last=2", "train.micro_batch_size=2",
            "train.global_batch_size=8", "data.eval_batches=0", "logging.progress_bar=false",
            "logging.wandb=off", *extra]


def launch(args: list[str], nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megatron_sgtm.train", "--config", TINY, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Own session: SIGKILL reaches torchrun and both workers at once, like a lost node.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:  # the writer may be mid-line while we poll
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


def final_state(ck: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ck / "final.pt"
    dcp_to_torch_save(str(ck / f"step_{STEPS:08d}" / "state"), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_sample_shards(path, n_train=120, n_test=5)
    return path


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(shards, tmp_path, capsys):
    ref_ck, ref_run = tmp_path / "ref_ck", tmp_path / "ref_run"
    # The uninterrupted reference goes through `sgtm train` (checks, prints, runs torchrun).
    code = cli.main(["--config", TINY, "--nproc", "2", *overrides(shards, ref_ck, ref_run)])
    printed = capsys.readouterr().out
    assert code == 0 and "+ " in printed and "--nproc-per-node=2" in printed

    kill_at = random.randint(2, STEPS - 2)
    ck, run_dir = tmp_path / "ck", tmp_path / "run"
    proc = launch(overrides(shards, ck, run_dir))
    deadline = time.time() + 240
    while logged_step(run_dir) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before the kill at step {kill_at}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted(p.name for p in ck.glob("step_*") if ".tmp" not in p.name)
    assert saved and saved[-1] < f"step_{STEPS:08d}", saved

    code, out = finish(launch(overrides(shards, ck, run_dir)))
    assert code == 0, out[-3000:]
    assert "resumed from step" in out

    assert losses(str(run_dir)) == losses(str(ref_run)), f"killed at step {kill_at}"
    ref, got = final_state(ref_ck), final_state(ck)
    assert ref.keys() == got.keys() and any(k.startswith("optimizer.") for k in ref)
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"killed at step {kill_at}: {different}"

    # Another partition may not resume from these checkpoints: one error, nothing touched.
    before = tree(ck)
    code = cli.main(["--config", TINY, "--nproc", "2", *overrides(shards, ck, run_dir),
                     "partition.forget_mlp_units=16"])
    err = capsys.readouterr().err
    assert code == 2 and "another partition" in err, err
    # The entry point itself refuses it too (torchrun children load, then check).
    code, out = finish(launch(overrides(shards, ck, run_dir, "partition.forget_mlp_units=16",
                                        f"train.steps={STEPS + 2}"), nproc=1))
    assert code != 0 and "error: checkpoint:" in out and "partition" in out, out[-3000:]
    assert tree(ck) == before


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    ck, run_dir = tmp_path / "ck", tmp_path / "run"
    # An absurd learning rate overflows the weights within a few steps.
    # Run the entry point without torchrun (one process) so its own exit code shows.
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29733", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_sgtm.train", "--config", TINY,
                           *overrides(shards, ck, run_dir, "train.lr=1e30", "train.grad_clip=0")],
                          env=env, capture_output=True, text=True, timeout=240)
    code, out = proc.returncode, proc.stderr
    assert code == 3, out[-3000:]
    assert "error: loss is" in out and "stopping without saving" in out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saved = sorted(int(p.name.split("_")[1]) for p in ck.glob("step_*") if ".tmp" not in p.name)
    assert saved and saved[-1] == max(steps) < STEPS
