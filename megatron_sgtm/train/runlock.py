"""One writer per checkpoint directory: a lock file with a heartbeat.

``CHECKPOINT_DIR/run.lock`` (JSON) names its holder: host, PID, the process start time, when the
run started, and the job it belongs to (SLURM job and restart count, torchrun run id and
restart count). While the run lives, a thread touches the file every ``heartbeat_s``.

A second run that finds the lock decides whether the holder is alive:
- same job, earlier attempt (a requeued SLURM job, a torchrun restart): the earlier attempt is
  over, because SLURM and torchrun stop every process before starting the next;
- same host: the holder's PID, checked with its process start time so a reused PID does not
  count;
- another host: the heartbeat's age, measured against the file server's own clock (the mtime
  of a file written just now in the same directory), so clocks of different hosts never meet.
  This is what makes the lock work on NFS/Lustre, where ``flock`` may be unsupported or local.

A live holder means ``LockHeld``: one clear error naming it. A dead one is taken over with a
warning. Creation uses ``O_CREAT | O_EXCL`` and takeover renames the stale file away first, so
two runs racing for a stale lock cannot both win.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

LOCK_FILE = "run.lock"


class LockHeld(Exception):
    """The checkpoint directory belongs to a live run; the message names it."""


@dataclass
class Holder:
    host: str
    pid: int
    pid_start: Optional[str]  # /proc/PID/stat start time: tells a reused PID apart
    started: str  # wall-clock start, ISO 8601, for people
    token: str
    slurm_job: Optional[str] = None
    slurm_restart: int = 0
    elastic_run: Optional[str] = None
    elastic_restart: int = 0

    @classmethod
    def me(cls) -> "Holder":
        env = os.environ
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_start=_start_time(os.getpid()),
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), token=secrets.token_hex(8),
                   slurm_job=env.get("SLURM_JOB_ID"),
                   slurm_restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
                   elastic_run=env.get("TORCHELASTIC_RUN_ID"),
                   elastic_restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, PID {self.pid}, started {self.started}{job}"

    def earlier_attempt_of(self, other: "Holder") -> bool:
        """True when ``self`` is an earlier attempt of the job ``other`` belongs to."""
        if self.slurm_job and self.slurm_job == other.slurm_job:
            if self.slurm_restart != other.slurm_restart:
                return self.slurm_restart < other.slurm_restart
        elif self.slurm_job or other.slurm_job:
            return False
        return bool(self.elastic_run) and self.elastic_run == other.elastic_run and \
            self.elastic_restart < other.elastic_restart


def _start_time(pid: int) -> Optional[str]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of proc(5), 1-based


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    now = _start_time(pid)
    if now is None:
        return True  # no /proc to compare with: assume the PID is still the holder
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    return state != "Z" and (start is None or now == start)


def _read(path: Path) -> Optional[Holder]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Half-written by a crash between create and write (the write is one small call, so
        # this is rare): an anonymous holder that only its heartbeat age can clear.
        return Holder(host="?", pid=-1, pid_start=None, started="?", token="?")


def _server_now(directory: Path) -> float:
    """The file system's current time: the mtime of a file created just now beside the lock."""
    probe = directory / f".{LOCK_FILE}.clock-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def holder_status(directory: Path, stale_s: float, me: Optional[Holder] = None
                  ) -> tuple[Optional[Holder], str]:
    """(holder, verdict) for ``directory``'s lock; verdict is "free", "live" or why it is dead."""
    path = Path(directory) / LOCK_FILE
    holder = _read(path)
    if holder is None:
        return None, "free"
    me = me or Holder.me()
    if holder.earlier_attempt_of(me):
        return holder, "an earlier attempt of this job"
    try:
        age = _server_now(path.parent) - path.stat().st_mtime
    except FileNotFoundError:
        return None, "free"
    if holder.host == me.host and holder.pid > 0:
        if not _pid_alive(holder.pid, holder.pid_start):
            return holder, f"PID {holder.pid} is no longer running"
        return holder, "live"
    if age > stale_s:
        return holder, f"its heartbeat stopped {age:.0f} s ago"
    return holder, "live"


def check_free(directory: Path, stale_s: float) -> Optional[str]:
    """Raise ``LockHeld`` if a live run holds ``directory``; else a warning about a stale lock
    that starting here would take over, or None. Reads only."""
    holder, verdict = holder_status(directory, stale_s)
    if verdict == "live":
        raise LockHeld(_held_message(directory, holder))
    if holder is not None:
        return f"checkpoint.dir {directory} has a stale lock ({holder.describe()}: {verdict})"
    return None


def _held_message(directory: Path, holder: Holder) -> str:
    return (f"checkpoint.dir {directory} is in use by another run ({holder.describe()}); "
            f"stop that run or use another checkpoint.dir")


class RunLock:
    """Acquire with ``RunLock.acquire``; the heartbeat thread runs until ``release``."""

    def __init__(self, directory: Path, me: Holder, heartbeat_s: float) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.me = me
        self.heartbeat_s = heartbeat_s
        self.lost: Optional[str] = None  # set when another run took the lock from us
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sgtm-run-lock", daemon=True)

    @classmethod
    def acquire(cls, directory, heartbeat_s: float, stale_s: float,
                warn: Callable[[str], None] = print) -> "RunLock":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lock = cls(directory, Holder.me(), heartbeat_s)
        for _ in range(20):  # each round either creates the lock or removes a stale one
            if lock._create():
                lock._thread.start()
                return lock
            holder, verdict = holder_status(directory, stale_s, lock.me)
            if verdict == "live":
                raise LockHeld(_held_message(directory, holder))
            if holder is not None and lock._remove_stale(holder):
                warn(f"warning: taking over checkpoint.dir {directory} from a dead run "
                     f"({holder.describe()}: {verdict})")
        raise LockHeld(f"checkpoint.dir {directory}: could not take its lock (other runs keep "
                       "taking it); try again")

    def _create(self) -> bool:
        tmp = self.path.with_name(f".{LOCK_FILE}.new-{self.me.token}")
        tmp.write_text(json.dumps(asdict(self.me)) + "\n", encoding="utf-8")
        try:
            # link() is atomic and fails if the name exists, also on NFS; the content is
            # complete before the lock appears.
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_stale(self, stale: Holder) -> bool:
        """Move the stale lock aside; only one of several racing runs succeeds."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{self.me.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # someone else removed it first; retry the creation
        moved = _read(aside)
        if moved is not None and moved.token != stale.token:
            # A live run re-created the lock between our read and the rename: give it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = _read(self.path)
            if holder is None or holder.token != self.me.token:
                self.lost = (f"another run took checkpoint.dir {self.path.parent} "
                             f"({holder.describe() if holder else 'lock removed'})")
                return
            try:
                os.utime(self.path)  # None: the file server's time, as the readers use
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.release_file()

    def release_file(self) -> None:
        """Remove the lock file if it is still ours (safe from any thread)."""
        holder = _read(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)
