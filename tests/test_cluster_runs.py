"""Cluster runs for real, on CPU: two-node rendezvous, a rank killed under --max-restarts,
preemption, orphans and the checkpoint.dir lock, hangs, and a one-node SLURM cluster running
the sbatch scripts and the study executor.

Every comparison is with one uninterrupted reference run (`sgtm train`, 2 processes, TP=2,
a checkpoint every 2 steps): interrupted, restarted, requeued and two-agent runs must end with
its losses and its final weights and optimizer state, bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _workers_train import losses
from test_train_resume import logged_step  # the last step in a run's metrics.jsonl
from megatron_sgtm.data.testing import write_sample_shards
from slurm_cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "train" / "tiny_cpu.yaml")
BIN = Path(sys.executable).parent
SGTM = str(BIN / "sgtm")
STEPS = 8


def overrides(shards, ck, *extra) -> list[str]:
    return [f"data.dir={shards}", f"checkpoint.dir={ck}", f"train.steps={STEPS}",
            "train.warmup_steps=2", "train.log_every=1", "checkpoint.save_every=2",
            "checkpoint.keep_last=8", "train.micro_batch_size=2", "train.global_batch_size=8",
            "data.eval_batches=0", "logging.progress_bar=false", "logging.wandb=off", *extra]


def env(**extra) -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    out["PATH"] = f"{BIN}:{out['PATH']}"
    return out


def start(args: list[str], **env_extra) -> subprocess.Popen:
    """`sgtm ARGS` in a process group of its own (so a test can kill the group)."""
    return subprocess.Popen([SGTM, *args], env=env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out:\n{out[-4000:]}")
    return proc.returncode, out


def wait_for_step(ck: Path, step: int, proc=None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while logged_step(ck) < step:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{proc.communicate()[0][-4000:]}")
        if time.time() > deadline:
            pytest.fail(f"step {step} not reached in {timeout} s")
        time.sleep(0.05)


def workers_of(pid: int) -> dict[int, int]:
    """RANK -> PID of the torchrun workers whose parent is ``pid``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1]) != pid:
                continue
            environ = dict(item.split("=", 1) for item in
                           (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                           if "=" in item)
        except (OSError, ValueError):
            continue
        if "TORCHELASTIC_RUN_ID" in environ:
            out[int(environ["RANK"])] = int(entry.name)
    return out


def group_members(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and \
                    int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[2]) == pgid:
                out.append(int(entry.name))
        except (OSError, ValueError):
            pass
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def final_state(ck: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ck.parent / f"{ck.name}-final.pt"
    dcp_to_torch_save(str(ck / f"step_{STEPS:08d}" / "state"), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def assert_same_run(ck: Path, reference: dict, what: str) -> None:
    assert losses(str(ck)) == reference["losses"], what
    got = final_state(ck)
    assert got.keys() == reference["state"].keys()
    different = [k for k in got if not torch.equal(got[k], reference["state"][k])]
    assert not different, f"{what}: {different}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_sample_shards(path, n_train=120, n_test=5)
    return path


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    ck = tmp_path_factory.mktemp("reference") / "ck"
    code, out = finish(start(["train", "--config", TINY, "--nproc", "2", "--tp", "2",
                              *overrides(shards, ck)]))
    assert code == 0 and f"done: step {STEPS}" in out, out[-4000:]
    state = final_state(ck)
    assert any(k.startswith("optimizer.") for k in state)
    return {"ck": ck, "losses": losses(str(ck)), "state": state}


# ---------------------------------------------------------------- two-node rendezvous


def sbatch_node_command(tmp_path: Path, port: int, config_args: list[str]) -> list[str]:
    """The per-node command `slurm_pretrain.sbatch` builds for a 2-node job whose first node
    is 127.0.0.1 (its dry run, with a stand-in `scontrol`)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "127.0.0.1\\n127.0.0.2\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    out = subprocess.run(["bash", str(ROOT / "launch" / "slurm_pretrain.sbatch"), *config_args],
                         env=env(SGTM_DRY_RUN="1", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2",
                                 SLURM_JOB_ID="4711", GPUS_PER_NODE="1",
                                 SGTM_RDZV_PORT=str(port), PATH=f"{bin_dir}:{BIN}:{os.environ['PATH']}"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    words = shlex.split(line[2:])
    assert words[:2] == ["srun", "--ntasks-per-node=1"], line
    return words[2:]


@pytest.mark.slow
def test_two_agents_on_two_nodes_match_one_agent(shards, reference, tmp_path):
    ck = tmp_path / "ck"
    port = free_port()
    node = sbatch_node_command(tmp_path, port, [TINY, *overrides(shards, ck), "tensor_parallel=2"])
    assert node[:2] == ["sgtm", "train"] and "--nnodes" in node and \
        node[node.index("--rdzv-endpoint") + 1] == f"127.0.0.1:{port}", node
    # Each "node" runs exactly that command: one agent, one process, rendezvous on 127.0.0.1.
    agents = [start(node[1:]) for _ in range(2)]
    results = [finish(a) for a in agents]
    for code, out in results:
        assert code == 0, out[-4000:]
    assert any(f"done: step {STEPS}" in out for _, out in results)
    assert_same_run(ck, reference, "two agents x one process vs one agent x two")


# ---------------------------------------------------------------- restarts and preemption


@pytest.mark.slow
def test_killed_rank_restarts_from_the_last_checkpoint_and_ends_exact(shards, reference, tmp_path):
    """SIGKILL of rank 1 at step >= 3: torchrun restarts the group (--max-restarts 1), which
    resumes from step 2, re-runs the lost step and ends with the reference's weights."""
    ck = tmp_path / "ck"
    proc = start(["train", "--config", TINY, "--nproc", "2", "--tp", "2", "--max-restarts", "1",
                  *overrides(shards, ck)], SGTM_FAULT_STEP_SLEEP="0.3")
    wait_for_step(ck, 3, proc)
    os.kill(workers_of(proc.pid)[1], signal.SIGKILL)
    code, out = finish(proc)
    assert code == 0 and f"done: step {STEPS}" in out, out[-4000:]
    resumed = re.search(r"resumed from step (\d+)", out)
    assert resumed and int(resumed.group(1)) in (2, 4), out[-4000:]
    steps = [json.loads(line)["step"] for line in (ck / "metrics.jsonl").read_text().splitlines()]
    lost = steps[:steps.index(int(resumed.group(1)) + 1, int(resumed.group(1)) + 1)]
    assert len(steps) > len(set(steps)) and lost, steps  # the lost step(s) were run again
    assert not (ck / "run.lock").exists()  # released at the end
    assert_same_run(ck, reference, "restarted after a rank was killed")


# ---------------------------------------------------------------- orphans, the lock, completion


@pytest.mark.slow
def test_workers_die_with_the_launcher_and_the_lock_keeps_one_writer(shards, tmp_path):
    ck = tmp_path / "ck"
    args = ["train", "--config", TINY, "--nproc", "1", *overrides(shards, ck),
            "train.steps=300", "checkpoint.save_every=4"]
    first = start(args, SGTM_FAULT_STEP_SLEEP="0.05")
    wait_for_step(ck, 5, first)
    workers = list(workers_of(first.pid).values())
    # With their helpers: the checkpoint writer's process lives in its worker's group.
    helpers = [pid for w in workers for pid in group_members(w) if pid != w]
    assert workers and helpers

    # A second run on the same directory is refused, naming the live holder.
    code, out = finish(start(args))
    lock = json.loads((ck / "run.lock").read_text())
    assert code == 2 and f"PID {lock['pid']}" in out and f"host {lock['host']}" in out and \
        f"started {lock['started']}" in out and "in use by another run" in out, out

    # kill -9 of the launcher's process group: its worker dies too and stops writing.
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    deadline = time.time() + 10
    while any(alive(p) for p in workers + helpers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(w) for w in workers), "orphaned worker still running"
    assert not any(alive(h) for h in helpers), "a worker's helper process outlived it"
    last = logged_step(ck)
    time.sleep(1)
    assert logged_step(ck) == last

    # The dead run's lock is taken over with a warning; the run finishes.
    saved = max(int(p.name.split("_")[1]) for p in ck.glob("step_*") if ".tmp" not in p.name)
    code, out = finish(start([*args, f"train.steps={saved + 1}"]))
    assert code == 0 and "stale lock" in out and "taking over" in out, out[-4000:]
    assert f"resumed from step {saved}" in out and f"done: step {saved + 1}" in out

    # Resuming a finished run says so, reports the stored metrics and trains nothing, both
    # through `sgtm train` and through the torchrun entry point itself.
    before = {str(p): p.stat().st_mtime_ns for p in ck.rglob("*")}
    code, out = finish(start([*args, f"train.steps={saved + 1}"]))
    assert code == 0 and out.strip().startswith("already complete:"), out
    assert f"holds step {saved + 1}" in out and "final loss" in out and "torchrun" not in out
    direct = subprocess.run(
        [sys.executable, "-m", "megatron_sgtm.train", "--config", TINY, *overrides(shards, ck),
         f"train.steps={saved + 1}"],
        env=env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-3000:]
    assert "already complete:" in direct.stdout and "final loss" in direct.stdout
    assert {str(p): p.stat().st_mtime_ns for p in ck.rglob("*")} == before


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_with_a_clear_error(shards, tmp_path):
    ck = tmp_path / "ck"
    t0 = time.time()
    # No checkpoints: a save is progress too, and slow on a loaded machine.
    code, out = finish(start(["train", "--config", TINY, "--nproc", "2", *overrides(shards, ck),
                              "checkpoint.dir=", "resilience.hang_timeout_s=10"],
                             SGTM_FAULT_HANG="1:3"), timeout=240)
    assert code == 4, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error: rank 1")]
    assert len(errors) == 1 and "no progress" in errors[0] and "step 3" in errors[0], out[-4000:]
    assert time.time() - t0 < 200


# ---------------------------------------------------------------- a real SLURM cluster


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    """The suite's cluster, its client environment with this checkout's `sgtm` on PATH."""
    slurm_cluster.env = env(SLURM_CONF=slurm_cluster.env["SLURM_CONF"])
    return slurm_cluster


def job_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


@pytest.mark.slow
def test_slurm_pretrain_preempted_requeued_then_post_ablation(cluster, shards, reference,
                                                              tmp_path):
    ck, log = tmp_path / "ck", tmp_path / "pretrain.log"
    job_env = dict(cluster.env, GPUS_PER_NODE="2", SGTM_RDZV_PORT=str(free_port()),
                   SGTM_FAULT_STEP_SLEEP="0.3")
    job = cluster.sbatch("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
                         f"--output={log}", str(ROOT / "launch" / "slurm_pretrain.sbatch"),
                         TINY, *overrides(shards, ck), "tensor_parallel=2",
                         env=job_env, cwd=tmp_path)
    wait_for_step(ck, 3)
    # What `#SBATCH --signal=USR1@120` does two minutes before the wall time.
    cluster.run("scancel", "--signal=USR1", job)
    cluster.release_requeued(job)
    record = cluster.wait(job, timeout=400)[0]
    text = job_log(log)
    # A str message: pytest shortens a tuple's repr, which hid the job log in a failure.
    assert record["JobState"] == "COMPLETED" and record.get("Restarts") == "1", "\n".join(
        [cluster.describe(record), "--- job log", text[-6000:], cluster.log_tail("slurmctld", 60),
         cluster.log_tail("slurmd", 40)])
    assert "preempted: SIGUSR1 at step" in text and "requeueing job" in text, text[-4000:]
    assert "resumed from step" in text and f"done: step {STEPS}" in text, text[-4000:]
    assert_same_run(ck, reference, "SLURM job preempted and requeued")

    out = tmp_path / "post"
    post_log = tmp_path / "post.log"
    post = cluster.sbatch("--gpus-per-node=0", f"--output={post_log}",
                          str(ROOT / "launch" / "slurm_post_ablation.sbatch"), str(ck), str(out),
                          str(shards), "--calibration-steps", "5", cwd=tmp_path)
    record = cluster.wait(post, timeout=400)[0]
    assert record["JobState"] == "COMPLETED", (record, job_log(post_log)[-4000:])
    # The ablated checkpoint: the forget MLP units' fc1 rows are zero, every other row is the
    # trained model's (megatron stacks the layers: [layers, ffn, hidden]).
    ablated, trained = torch_state(out / "ablated"), torch_state(ck)
    from megatron_sgtm.partition import build_partition
    from megatron_sgtm.train.config import load_experiment

    cfg = load_experiment(TINY, overrides(shards, ck))
    forget = torch.tensor(build_partition(cfg.model, cfg.partition, cfg.routing).forget_mlp)
    keep = torch.tensor([i for i in range(cfg.model.ffn_hidden_size) if i not in forget.tolist()])
    fc1 = [k for k in ablated if k.endswith("mlp.linear_fc1.weight") and "optimizer" not in k]
    assert fc1, sorted(ablated)
    for key in fc1:
        assert torch.count_nonzero(ablated[key].index_select(-2, forget)) == 0, key
        assert torch.count_nonzero(trained[key].index_select(-2, forget)) > 0, key
        assert torch.equal(ablated[key].index_select(-2, keep), trained[key].index_select(-2, keep))
    # ... and its evaluation: plain and calibrated losses on the held-out splits.
    rows = [json.loads(line) for line in (out / "eval").read_text().splitlines()]
    assert {(r["split"], r["calibrated"]) for r in rows} >= {
        ("forget", False), ("retain", False), ("forget", True), ("retain", True)}, rows
    assert all(math.isfinite(r["loss"]) for r in rows)


def torch_state(ck: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megatron_sgtm.checkpoint import resolve

    directory = resolve(ck)
    out = ck.parent / f"{ck.name}-state.pt"
    dcp_to_torch_save(str(directory / "state"), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_slurm_study_executor_then_analyze(cluster, tmp_path):
    micro = str(ROOT / "configs" / "studies" / "micro.yaml")
    out = tmp_path / "study"
    res = subprocess.run([SGTM, "study", micro, "--out", str(out), "--executor", "slurm",
                          "--sbatch-arg=--cpus-per-task=1", f"--sbatch-arg=--output={tmp_path}/%A_%a.log"],
                         env=cluster.env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    job = res.stderr.split("submitted array job ")[1].split()[0]
    records = cluster.wait(job, timeout=900)
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log"))
    assert len(records) == 7 and {r["JobState"] for r in records} == {"COMPLETED"}, \
        ([r.get("JobState") for r in records], logs)
    res = subprocess.run([SGTM, "study", micro, "--out", str(out), "--analyze"], env=cluster.env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    import csv

    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7 and {r["status"] for r in rows} == {"done"}
    assert {(r["size"], r["method"]) for r in rows if r["kind"] == "main"} == {
        (s, m) for s in ("s16", "s32") for m in ("no_filter", "sgtm")}
    assert "scaling law" in (out / "report.txt").read_text()
