"""The pieces behind cluster runs, one process each: the checkpoint-directory lock, preempt
signals, the hang watchdog, parent-death, the launcher's exit statuses and the config section.
The real runs (torchrun, SLURM) are in test_cluster_runs.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_sgtm.configbase import ConfigError
from megatron_sgtm.train.completion import complete_message
from megatron_sgtm.train.config import load_experiment
from megatron_sgtm.train.launcher import LaunchPlan, _exit_status, _failed_status
from megatron_sgtm.train.preempt import StopRequest
from megatron_sgtm.train.runlock import LOCK_FILE, Holder, LockHeld, RunLock, check_free

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny_cpu.yaml"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(directory: Path, **fields) -> dict:
    holder = dict(host="vm-elsewhere", pid=4242, pid_start=None, started="2026-01-01T00:00:00",
                  token="old0token", slurm_job=None, slurm_restart=0, elastic_run=None,
                  elastic_restart=0)
    holder.update(fields)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(json.dumps(holder))
    return holder


# ---------------------------------------------------------------- the lock


def test_lock_refuses_a_live_holder_and_names_it(tmp_path):
    lock = RunLock.acquire(tmp_path, heartbeat_s=10, stale_s=60)
    try:
        stored = json.loads((tmp_path / LOCK_FILE).read_text())
        assert stored["pid"] == os.getpid() and stored["host"] == Holder.me().host
        for attempt in (lambda: RunLock.acquire(tmp_path, 10, 60), lambda: check_free(tmp_path, 60)):
            with pytest.raises(LockHeld) as err:
                attempt()
            text = str(err.value)
            assert f"PID {os.getpid()}" in text and f"host {stored['host']}" in text \
                and f"started {stored['started']}" in text
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert check_free(tmp_path, 60) is None


def test_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path):
    write_lock(tmp_path, host=Holder.me().host, pid=dead_pid())
    assert "no longer running" in check_free(tmp_path, 60)
    warnings = []
    lock = RunLock.acquire(tmp_path, 10, 60, warn=warnings.append)
    try:
        assert len(warnings) == 1 and "taking over" in warnings[0] and "no longer running" in warnings[0]
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.me.token
    finally:
        lock.release()


def test_other_host_lock_is_live_until_its_heartbeat_stops(tmp_path):
    write_lock(tmp_path)  # another host: only the heartbeat (the file's mtime) tells
    with pytest.raises(LockHeld, match="vm-elsewhere"):
        RunLock.acquire(tmp_path, 10, 60)
    old = time.time() - 120
    os.utime(tmp_path / LOCK_FILE, (old, old))
    warnings = []
    lock = RunLock.acquire(tmp_path, 10, 60, warn=warnings.append)
    lock.release()
    assert "heartbeat stopped" in warnings[0]


def test_an_earlier_attempt_of_the_same_job_is_over(tmp_path, monkeypatch):
    # A requeued SLURM job (restart count 1) takes over from its first attempt at once, even
    # with a fresh heartbeat on another host; another job's lock stays live.
    write_lock(tmp_path, slurm_job="77", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(LockHeld):
        RunLock.acquire(tmp_path, 10, 60)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    warnings = []
    RunLock.acquire(tmp_path, 10, 60, warn=warnings.append).release()
    assert "earlier attempt" in warnings[0]
    # The same for a torchrun restart (no SLURM).
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    write_lock(tmp_path, elastic_run="r1", elastic_restart=0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    RunLock.acquire(tmp_path, 10, 60, warn=warnings.append).release()


def test_racing_takeovers_of_a_stale_lock_have_one_winner(tmp_path):
    write_lock(tmp_path, host=Holder.me().host, pid=dead_pid())
    results, barrier = [], threading.Barrier(4)

    def contender():
        barrier.wait()
        try:
            results.append(RunLock.acquire(tmp_path, 10, 60, warn=lambda _: None))
        except LockHeld as exc:
            results.append(exc)

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, RunLock)]
    assert len(winners) == 1 and len(results) == 4
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == winners[0].me.token
    winners[0].release()


def test_heartbeat_moves_and_a_lost_lock_is_noticed(tmp_path):
    lock = RunLock.acquire(tmp_path, heartbeat_s=0.05, stale_s=1)
    path = tmp_path / LOCK_FILE
    old = time.time() - 100
    os.utime(path, (old, old))
    deadline = time.time() + 5
    while path.stat().st_mtime < old + 50 and time.time() < deadline:
        time.sleep(0.02)
    assert path.stat().st_mtime > old + 50, "heartbeat did not touch the lock"
    write_lock(tmp_path, token="thief")  # another run took it over
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.02)
    assert lock.lost and "another run took" in lock.lost
    lock.release()
    assert json.loads(path.read_text())["token"] == "thief"  # not ours: left alone


# ---------------------------------------------------------------- preempt signals


def test_stop_request_catches_the_signal_and_agrees_alone():
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest([signal.SIGUSR2], check_every=2, rank=0)
    try:
        assert stop.agree(2) == (None, False)
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.time() + 5
        while stop.signum is None and time.time() < deadline:
            time.sleep(0.01)
        assert stop.signum == signal.SIGUSR2
        assert stop.agree(3) == (None, False)  # not a check step
        assert stop.agree(4) == (signal.SIGUSR2, False)
        assert stop.agree(5, lock_lost=True, force=True) == (signal.SIGUSR2, True)
    finally:
        stop.close()
    # After a stop, late copies of the signal are ignored (the process exits 75).
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    signal.signal(signal.SIGUSR2, before)
    unused = StopRequest([signal.SIGUSR2], 1, 0)
    unused.close()
    assert signal.getsignal(signal.SIGUSR2) is before


# ---------------------------------------------------------------- watchdog and parent death

CHILD = "import sys; sys.path.insert(0, %r)\n" % str(ROOT)


def test_watchdog_ends_a_stuck_process_with_status_4():
    code = CHILD + ("from megatron_sgtm.train.watchdog import Watchdog\n"
                    "import time\nw = Watchdog(0.5, rank=3)\nw.beat(7, 'training')\n"
                    "time.sleep(60)\n")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 4, out.stderr
    assert "error: rank 3" in out.stderr and "step 7" in out.stderr and "no progress" in out.stderr
    assert time.time() - t0 < 30


def test_fault_injection_hangs_the_named_rank_at_the_named_step():
    code = CHILD + ("from megatron_sgtm.train.watchdog import Watchdog\n"
                    "w = Watchdog(1.0, rank=1)\nfor step in range(10):\n    w.beat(step)\n")
    env = dict(os.environ, SGTM_FAULT_HANG="1:4")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 4 and "step 4, sleeping (SGTM_FAULT_HANG)" in out.stderr
    env["SGTM_FAULT_HANG"] = "0:4"  # another rank: runs through
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr


def test_worker_dies_with_its_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = CHILD + ("from megatron_sgtm.train.parentdeath import die_with_parent\n"
                     f"assert die_with_parent()\nopen({str(pid_file)!r}, 'w').write(str(__import__('os').getpid()))\n"
                     "import time\ntime.sleep(120)\n")
    parent = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the child outlived its parent")


# ---------------------------------------------------------------- launcher statuses


def failures(**codes):
    return {int(rank[1:]): SimpleNamespace(exitcode=code) for rank, code in codes.items()}


def test_failed_worker_group_status(capsys):
    assert _failed_status(failures(r0=2, r1=2)) == 2
    assert capsys.readouterr().err == ""  # the workers printed their own error
    assert _failed_status(failures(r0=1, r1=4)) == 4  # rank 0 only stopped with the hung one
    assert "status 4 (a rank hung) from rank(s) [1]" in capsys.readouterr().err
    assert _failed_status(failures(r0=75, r1=75)) == 75
    assert _failed_status(failures(r0=1, r1=-9)) == 1
    assert "rank 1 was killed by SIGKILL" in capsys.readouterr().err
    assert _failed_status(failures(r0=2, r1=3)) == 1


def test_exit_status_is_read_without_reaping():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(75)"])
    deadline = time.time() + 30
    status = None
    while status is None and time.time() < deadline:
        status = _exit_status(proc.pid)
        time.sleep(0.02)
    assert status == 75 and _exit_status(proc.pid) == 75
    assert proc.wait() == 75  # still there for its owner to collect
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    while _exit_status(killed.pid) is None:
        time.sleep(0.02)
    assert _exit_status(killed.pid) == -signal.SIGKILL
    killed.wait()


def test_launch_plan_arguments():
    plan = LaunchPlan(nproc_per_node=4, train_args=["--config", "x.yaml"], nnodes=2,
                      rdzv_endpoint="node01:29500", rdzv_id="77", max_restarts=3,
                      preempt_signals=["SIGTERM", "SIGUSR1"])
    assert plan.torchrun_args() == [
        "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node01:29500", "--rdzv-id=77",
        "--nproc-per-node=4", "--max-restarts=3", "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
        "-m", "megatron_sgtm.train", "--config", "x.yaml"]
    local = LaunchPlan(nproc_per_node=1, train_args=[], preempt_signals=["SIGUSR1"])
    assert local.torchrun_args()[:1] == ["--standalone"]
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT" in local.torchrun_args()


# ---------------------------------------------------------------- config and messages


def test_resilience_config_is_validated():
    cfg = load_experiment(TINY, ["resilience.preempt_signals=[USR1, SIGTERM]"])
    assert cfg.resilience.signal_names() == ["SIGUSR1", "SIGTERM"]
    with pytest.raises(ConfigError) as err:
        load_experiment(TINY, ["resilience.preempt_signals=[SIGKILL]", "resilience.stop_check_every=0",
                               "resilience.lock_stale_s=1"])
    text = str(err.value)
    assert "SIGKILL cannot be used" in text and "stop_check_every" in text and "lock_stale_s" in text


def test_complete_message_reports_stored_metrics():
    text = complete_message(300, 300, {"loss": 4.25, "eval": {"eval/test_retain": 4.5}}, "ck/step_300")
    assert text.startswith("already complete: ck/step_300 holds step 300;")
    assert "final loss 4.2500" in text and "eval/test_retain=4.5000" in text
    assert "not stored" in complete_message(5, 3, None, "ck") and "train.steps is 3" in \
        complete_message(5, 3, None, "ck")
