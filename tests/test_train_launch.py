"""launch/ scripts: each prints the exact command it runs; SGTM_DRY_RUN=1 stops there."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script: str, args: list[str], env: dict | None = None, path_dir: Path | None = None):
    full_env = dict(os.environ, SGTM_DRY_RUN="1", **(env or {}))
    if path_dir is not None:
        full_env["PATH"] = f"{path_dir}:{full_env['PATH']}"
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=30)


def test_local_prints_torchrun_command():
    out = dry_run("local.sh", ["2", "configs/train/tiny_cpu.yaml", "tensor_parallel=2"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("+ torchrun --standalone --nproc-per-node 2 -m megatron_sgtm.train "
                                  "--config configs/train/tiny_cpu.yaml tensor_parallel=2")


def test_local_usage_error():
    out = dry_run("local.sh", ["2"])
    assert out.returncode == 2 and "usage" in out.stderr


def test_slurm_pretrain_uses_first_host_and_c10d(tmp_path):
    # `scontrol show hostnames` expands a node list; a stand-in that expands "node[01-02]"
    # lets the dry run show the rendezvous endpoint off a cluster.
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "node01\\nnode02\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {"SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77",
           "GPUS_PER_NODE": "4"}
    out = dry_run("slurm_pretrain.sbatch", ["configs/train/64m_gpu.yaml", "train.steps=5"], env,
                  tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "+ srun --ntasks-per-node=1 torchrun --nnodes 2 --nproc-per-node 4 --rdzv-id 77 "
        "--rdzv-backend c10d --rdzv-endpoint node01:29500 -m megatron_sgtm.train "
        "--config configs/train/64m_gpu.yaml train.steps=5")


def test_slurm_pretrain_outside_allocation_is_an_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(ROOT / "launch" / "slurm_pretrain.sbatch"), "x.yaml"],
                         env=dict(env, SGTM_DRY_RUN="1"), capture_output=True, text=True)
    assert out.returncode == 2 and "not inside a SLURM allocation" in out.stderr


def test_post_ablation_runs_ablate_then_eval():
    out = dry_run("slurm_post_ablation.sbatch", ["runs/x", "runs/x-post", "shards", "--generate", "8"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "+ sgtm ablate runs/x --out runs/x-post/ablated",
        "+ sgtm eval runs/x-post/ablated --data shards --ablate no --out runs/x-post/eval --generate 8"]


def test_deepspeed_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node01 slots=8\nnode02 slots=8\n")
    out = dry_run("deepspeed_hostfile.sh", [str(hostfile), "configs/train/64m_gpu.yaml",
                                            "engine.zero_stage=2"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"+ deepspeed --hostfile {hostfile} --master_port 29500 --no_local_rank --module megatron_sgtm.train "
        "--config configs/train/64m_gpu.yaml engine.name=deepspeed engine.zero_stage=2")
    missing = dry_run("deepspeed_hostfile.sh", [str(tmp_path / "nope"), "c.yaml"])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize("script", ["local.sh", "slurm_pretrain.sbatch",
                                    "slurm_post_ablation.sbatch", "deepspeed_hostfile.sh"])
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / script)]).returncode == 0
