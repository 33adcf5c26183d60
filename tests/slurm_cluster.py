"""A real one-node SLURM cluster for the test suite: munged, slurmctld and slurmd on this machine.

Debian's ``slurm-wlm`` and ``munge`` are installed with apt when missing (CI here runs as root
with apt). Everything the daemons write (key, socket, state, spool, logs, pid files) lives in
one temporary directory, and the ports are picked free, so several clusters (other checkouts'
test runs) can share the machine. The daemons are stopped by the PIDs they were started with.

``SlurmCluster.env`` is what a client command (sbatch, scontrol, ...) needs: ``SLURM_CONF``
and the munge socket are in it; the jobs inherit it because sbatch exports the environment.
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

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def unavailable_reason() -> Optional[str]:
    """Why this machine cannot run the test cluster, or None when it can (installing first)."""
    if all(_which(d) for d in DAEMONS) and _which("sbatch"):
        return None if os.geteuid() == 0 else "the test SLURM cluster needs root"
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if shutil.which("apt-get") is None:
        return "slurm-wlm/munge are not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode:
            return f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}"
    missing = [d for d in (*DAEMONS, "sbatch") if not _which(d)]
    return f"installed {PACKAGES} but {missing} are still missing" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One node (this host, ``cpus`` CPUs), one default partition ``test``."""

    def __init__(self, cpus: int = 2) -> None:
        # Not under pytest's tmp_path: munged must traverse every parent directory as the
        # munge user, and pytest's base directory is private to root.
        self.root = Path(tempfile.mkdtemp(prefix="sgtm-slurm-"))
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.pids: dict[str, int] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *SBIN])

    # ------------------------------------------------------------------ start / stop

    def start(self) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            self._start("slurmctld", [_which("slurmctld"), "-f", str(self.conf)],
                        self.root / "slurmctld.pid")
            self._start("slurmd", [_which("slurmd"), "-f", str(self.conf), "-N", self.host],
                        self.root / "slurmd.pid")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(parents=True)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        munge = pwd.getpwnam("munge")
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        os.chmod(mdir, 0o700)
        # munged refuses a root-writable parent unless forced; the directory is ours alone.
        os.chmod(self.root, 0o755)
        pid_file = mdir / "munged.pid"
        res = subprocess.run(["runuser", "-u", "munge", "--", _which("munged"), "--force",
                              f"--socket={self.socket}", f"--key-file={key}",
                              f"--pid-file={pid_file}", f"--log-file={mdir / 'munged.log'}",
                              f"--seed-file={mdir / 'munged.seed'}"],
                             capture_output=True, text=True, timeout=60)
        if res.returncode:
            raise RuntimeError(f"munged failed to start: {res.stderr.strip()}")
        self.pids["munged"] = self._read_pid(pid_file, "munged")

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=sgtmtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=2
MinJobAge=600
KillWait=10
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, cmd: list[str], pid_file: Path) -> None:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode:
            raise RuntimeError(f"{name} failed to start ({res.returncode}): "
                               f"{res.stderr.strip()}\n{self.log_tail(name)}")
        self.pids[name] = self._read_pid(pid_file, name)

    def _read_pid(self, path: Path, name: str, timeout: float = 20) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no pid file {path}\n{self.log_tail(name)}")

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.node_state()
            if state.startswith("IDLE"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"node never became idle (state {state!r})\n"
                           f"{self.log_tail('slurmctld')}\n{self.log_tail('slurmd')}")

    def stop(self) -> None:
        """Stop every daemon this cluster started, by PID (slurmd, slurmctld, then munged)."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Stop the daemons and delete the cluster's directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ client commands

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True,
                             text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}")
        return res

    def node_state(self) -> str:
        res = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return res.stdout.strip().upper()

    def sbatch(self, *args: str, env: Optional[dict] = None, cwd=None) -> str:
        res = self.run("sbatch", "--parsable", *args, env=env or self.env, cwd=cwd)
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (array jobs: the first task's record)."""
        res = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        line = res.stdout.strip().splitlines()[0] if res.stdout.strip() else ""
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def jobs(self, job_id: str) -> list[dict]:
        res = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in res.stdout.splitlines()
                if line.strip()]

    def wait(self, job_id: str, timeout: float = 300, done=("COMPLETED", "FAILED",
                                                           "CANCELLED", "TIMEOUT",
                                                           "NODE_FAIL", "OUT_OF_MEMORY")) -> list[dict]:
        """Wait until every task of ``job_id`` is in a final state; returns their records."""
        deadline = time.time() + timeout
        records: list[dict] = []
        while time.time() < deadline:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in done for r in records):
                return records
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: "
                           f"{[r.get('JobState') for r in records]}\n{self.log_tail('slurmctld')}")

    @staticmethod
    def describe(record: dict) -> str:
        """The fields of a job record that say why it ended, for assertion messages."""
        keys = ("JobId", "JobState", "Reason", "ExitCode", "Restarts", "Requeue", "BatchFlag",
                "RunTime", "StartTime", "EndTime")
        return " ".join(f"{k}={record.get(k)}" for k in keys)

    def release_requeued(self, job_id: str, timeout: float = 300) -> dict:
        """Wait until ``job_id`` is back in the queue after a requeue, then let it start now.

        SLURM holds a requeued batch job for two minutes before it may start again (a fixed
        delay, not a slurm.conf setting); an administrator's ``scontrol update StartTime=now+3``
        lifts it, which keeps the test short without changing what the job does. It lifts it
        to a few seconds from now, not to now: slurmd revokes the first run's job credential
        with a timestamp in whole seconds and refuses any credential of that job created in
        the same second ("Job credential revoked"), so a restart within that second fails
        the job (the hold exists for this)."""
        deadline = time.time() + timeout
        record: dict = {}
        while time.time() < deadline:
            record = self.job(job_id)
            if record.get("JobState") == "PENDING" and int(record.get("Restarts", "0")) >= 1:
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")
                return record
            if record.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                return record
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} was not requeued: {record}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = {"munged": self.root / "munge" / "munged.log"}.get(
            name, self.root / "log" / f"{name}.log")
        if not path.exists():
            return f"({path} missing)"
        return f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
