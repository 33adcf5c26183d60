"""A one-node SLURM cluster for the prep tests, started from the recipe in shared/DESIGN.md.

Used only when the suite has no ``slurm_cluster`` fixture of its own (see
test_prep_slurm.py). munged, slurmctld and slurmd run as root with every file (key, socket,
state, spool, logs, pids) in one temporary directory and free ports, so other clusters on the
machine are not disturbed; they are stopped by the PIDs they wrote.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

SBIN = ["/usr/sbin", "/usr/bin", "/sbin"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def _find(name: str) -> Optional[str]:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def unavailable() -> Optional[str]:
    """Why no test cluster can run here (None: it can)."""
    if os.geteuid() != 0:
        return "the one-node SLURM test cluster runs its daemons as root"
    missing = [n for n in ("munged", "slurmctld", "slurmd", "sbatch") if not _find(n)]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does)"
    return None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OneNodeSlurm:
    """``root=None``: a fresh directory in the system temp dir (pytest's own temp dirs are
    private to root, and munged runs as the munge user)."""

    def __init__(self, root: Optional[Path] = None, cpus: int = 2) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="sgtm-prep-slurm-"))
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.pid_files = {n: self.root / f"{n}.pid" for n in ("slurmd", "slurmctld")}
        self.pid_files["munged"] = self.root / "munge" / "pid"  # written by the munge user
        self.env = dict(os.environ, SLURM_CONF=str(self.conf),
                        PATH=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))

    def start(self) -> "OneNodeSlurm":
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged checks that its directories are not world-writable
        try:
            self._munge()
            self._write_conf()
            for name, extra in (("slurmctld", []), ("slurmd", ["-N", self.host])):
                subprocess.run([_find(name), "-f", str(self.conf), *extra], env=self.env, check=True,
                               capture_output=True, timeout=60)
                self._pid(name)
            self._until(lambda: self.run("sinfo", "-h", "-N", "-o", "%T").stdout.strip().upper()
                        .startswith("IDLE"), 60, "node never became idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _munge(self) -> None:
        d = self.root / "munge"
        d.mkdir()
        os.chmod(d, 0o711)  # clients reach the socket; only munge lists the directory
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        user = pwd.getpwnam("munge")
        for p in (d, key):
            os.chown(p, user.pw_uid, user.pw_gid)
        os.chmod(key, 0o400)
        self.socket = d / "socket"
        subprocess.run(["runuser", "-u", "munge", "--", _find("munged"), "--force",
                        f"--socket={self.socket}", f"--key-file={key}", f"--pid-file={self.pid_files['munged']}",
                        f"--log-file={d / 'log'}", f"--seed-file={d / 'seed'}"],
                       check=True, capture_output=True, timeout=60)
        self._pid("munged")

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=preptest", f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_port()}", f"SlurmdPort={_port()}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.socket}", "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}", f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none",
            "ReturnToService=2", "SchedulerParameters=sched_interval=1", "MinJobAge=600",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))

    def _pid(self, name: str) -> int:
        path = self.pid_files[name]
        self._until(lambda: path.exists() and path.read_text().strip(), 20, f"{name} wrote no pid file")
        return int(path.read_text().split()[0])

    def _until(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            time.sleep(0.2)
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in self.root.glob("*.log"))
        raise RuntimeError(f"{what}\n{logs}")

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            path = self.pid_files[name]
            if not path.exists() or not path.read_text().strip():
                continue
            pid = int(path.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def job_states(env: dict, job: str) -> list[str]:
    res = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                         text=True, timeout=60)
    return [m.group(1) for m in re.finditer(r"JobState=(\S+)", res.stdout)]


def wait_jobs(env: dict, jobs: list[str], timeout: float = 300) -> dict[str, list[str]]:
    """Final states of every task of ``jobs`` (waits until all are final)."""
    deadline = time.time() + timeout
    states: dict[str, list[str]] = {}
    while time.time() < deadline:
        states = {j: job_states(env, j) for j in jobs}
        if all(s and all(x in FINAL for x in s) for s in states.values()):
            return states
        time.sleep(0.5)
    raise TimeoutError(f"jobs not finished after {timeout} s: {states}")
