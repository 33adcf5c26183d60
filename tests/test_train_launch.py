"""launch/ scripts: each prints the exact command it runs; SGTM_DRY_RUN=1 stops there."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script: str, args: list[str], env: dict | None = None, path_dir: Path | None = None,
            dry: bool = True):
    full_env = dict(os.environ, **(env or {}))
    full_env["SGTM_DRY_RUN"] = "1" if dry else "0"
    # `sgtm` of this checkout (the scripts run it for their checks), then any stand-ins.
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env['PATH']}"
    if path_dir is not None:
        full_env["PATH"] = f"{path_dir}:{full_env['PATH']}"
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=30)


def test_local_prints_torchrun_command():
    out = dry_run("local.sh", ["2", "configs/train/tiny_cpu.yaml", "tensor_parallel=2"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("+ sgtm train --nproc 2 --config configs/train/tiny_cpu.yaml "
                                  "tensor_parallel=2")


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
        "+ srun --ntasks-per-node=1 sgtm train --nnodes 2 --nproc 4 --rdzv-id 77 "
        "--rdzv-endpoint node01:29500 --max-restarts 0 "
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
                                    "slurm_post_ablation.sbatch", "deepspeed_hostfile.sh",
                                    "slurm_study_array.sbatch"])
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / script)]).returncode == 0


# ---------------------------------------------------------------- bad input, for real (no dry run)

TINY = "configs/train/tiny_cpu.yaml"


def fake_scontrol(tmp_path: Path, hosts: str = "127.0.0.1") -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo {hosts}\n')
    scontrol.chmod(0o755)
    return bin_dir


ALLOCATION = {"SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_JOB_ID": "5",
              "SLURM_ARRAY_TASK_ID": "0"}


def one_error(out) -> str:
    """The script failed with exit 2 and exactly one error line; returns that line."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, (out.returncode, out.stdout, out.stderr)
    return errors[0]


@pytest.mark.parametrize("script,args", [
    ("local.sh", ["2", "missing.yaml"]),
    ("slurm_pretrain.sbatch", ["missing.yaml"]),
    ("slurm_study_array.sbatch", ["missing.yaml", "out"]),
    ("slurm_post_ablation.sbatch", ["missing_ckpt", "out", "missing_data"]),
])
def test_missing_config_is_one_error(script, args, tmp_path):
    out = dry_run(script, args, ALLOCATION, fake_scontrol(tmp_path), dry=False)
    assert "does not exist" in one_error(out) and "missing" in one_error(out)


@pytest.mark.parametrize("script", ["slurm_post_ablation.sbatch", "slurm_study_array.sbatch"])
def test_outside_an_allocation_is_one_error(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(ROOT / "launch" / script), "a", "b", "c"],
                         env=dict(env, SGTM_DRY_RUN="0"), capture_output=True, text=True)
    assert "not" in one_error(out) and ("allocation" in out.stderr or "sbatch" in out.stderr)


def test_world_size_not_divisible_by_tp_x_pp(tmp_path):
    # 3 processes per node cannot be split into tensor-parallel pairs.
    out = dry_run("slurm_pretrain.sbatch", [str(ROOT / TINY), "tensor_parallel=2"],
                  dict(ALLOCATION, GPUS_PER_NODE="3"), fake_scontrol(tmp_path), dry=False)
    line = one_error(out)
    assert "3 processes" in line and "GPUS_PER_NODE" in line and "tensor_parallel 2" in line \
        and "pipeline_parallel 1" in line, line
    local = dry_run("local.sh", ["3", str(ROOT / TINY), "tensor_parallel=2"], dry=False)
    assert "not divisible by tensor_parallel 2" in one_error(local)


def test_rendezvous_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = dry_run("slurm_pretrain.sbatch", [str(ROOT / TINY)],
                      dict(ALLOCATION, GPUS_PER_NODE="1", SGTM_RDZV_PORT=str(port)),
                      fake_scontrol(tmp_path), dry=False)
        assert f"port {port}" in one_error(out) and "in use" in one_error(out)
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("127.0.0.1 slots=2\n")
        ds = dry_run("deepspeed_hostfile.sh", [str(hostfile), str(ROOT / TINY)],
                     {"SGTM_MASTER_PORT": str(port)}, dry=False)
        assert f"port {port}" in one_error(ds) and "in use" in one_error(ds)
