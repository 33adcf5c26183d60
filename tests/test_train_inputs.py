"""Bad inputs to `sgtm train`: one clear error each, a non-zero exit, nothing launched."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sgtm.data.testing import write_sample_shards
from megatron_sgtm.train import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_sample_shards(path, n_train=40, n_test=5)
    return path


def sgtm_train(capsys, *args):
    code = cli.main(["--config", TINY, "--dry-run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_the_torchrun_command(capsys, shards, tmp_path):
    code, out, err = sgtm_train(capsys, "--nproc", "2", "--tp", "2", f"data.dir={shards}",
                                f"checkpoint.dir={tmp_path / 'ck'}")
    assert code == 0, err
    assert out.startswith("+ ")
    assert out.startswith("+ torchrun --standalone --nproc-per-node=2 --max-restarts=0 ")
    assert " -m megatron_sgtm.train " in out
    assert f"--config {TINY}" in out and out.rstrip().endswith("tensor_parallel=2")


def test_unknown_config_key(capsys, shards):
    code, _, err = sgtm_train(capsys, f"data.dir={shards}", "train.stepz=3", "enigne.name=x")
    assert code == 2
    assert "train.stepz: unknown key" in err and "enigne: unknown key" in err
    assert err.count("error:") == 1


def test_indivisible_partition(capsys, shards):
    code, _, err = sgtm_train(capsys, "--nproc", "2", "--tp", "2", f"data.dir={shards}",
                              "partition.forget_heads=1")
    assert code == 2 and "cannot be split evenly over tensor_parallel = 2" in err


def test_processes_that_do_not_fit_the_batch(capsys, shards):
    code, _, err = sgtm_train(capsys, "--nproc", "3", f"data.dir={shards}")
    assert code == 2 and "not a multiple of micro_batch_size x data-parallel" in err


def _copy(shards: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(shards, dst)
    return dst


def test_truncated_shard(capsys, shards, tmp_path):
    bad = _copy(shards, tmp_path)
    data = bad / "train_tokens.bin"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    code, _, err = sgtm_train(capsys, f"data.dir={bad}")
    assert code == 2 and err.startswith("error: data: ") and "train_tokens" in err
    # The torchrun entry refuses it the same way (what every rank would print).
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29731", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_sgtm.train", "--config", TINY,
                           f"data.dir={bad}", "checkpoint.dir=", "logging.run_dir="],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: data: " in proc.stderr and "Traceback" not in proc.stderr


def test_mismatched_label_sidecar(capsys, shards, tmp_path):
    bad = _copy(shards, tmp_path)
    for ext in ("bin", "idx"):
        shutil.copy(bad / f"test_retain_labels.{ext}", bad / f"train_labels.{ext}")
    code, _, err = sgtm_train(capsys, f"data.dir={bad}")
    assert code == 2 and err.startswith("error: data: ") and "train_labels" in err


def test_missing_data_dir(capsys, tmp_path):
    code, _, err = sgtm_train(capsys, f"data.dir={tmp_path / 'nope'}")
    assert code == 2 and "error: data:" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU-only machines")
def test_distributed_optimizer_needs_cuda(capsys, shards):
    code, _, err = sgtm_train(capsys, f"data.dir={shards}", "engine.distributed_optimizer=true")
    assert code == 2 and "distributed_optimizer needs CUDA" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU-only machines")
def test_bf16_params_need_cuda(capsys, shards):
    code, _, err = sgtm_train(capsys, f"data.dir={shards}", "model.params_dtype=bf16")
    assert code == 2 and "params_dtype bf16 needs CUDA" in err


def test_unknown_compile_backend(capsys, shards, tmp_path):
    # Reaches the trainer: the backend list is torch's, read when the model is compiled.
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29741", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_sgtm.train", "--config", TINY,
                           f"data.dir={shards}", f"logging.run_dir={tmp_path}", "checkpoint.dir=",
                           "train.compile=true", "train.compile_backend=no_such_backend",
                           "logging.wandb=off", "logging.progress_bar=false"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "'no_such_backend' is not a torch.compile backend" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU-only machines")
def test_te_attention_needs_cuda_and_te(capsys, shards):
    code, _, err = sgtm_train(capsys, f"data.dir={shards}", "model.attention_backend=te")
    assert code == 2 and "attention_backend te needs CUDA and Transformer Engine" in err
