"""torchrun's elastic agent, run inside ``sgtm train``, with the exit statuses a batch script
needs.

``sgtm train`` calls ``run_agent`` in its own process: the same ``torch.distributed.run`` code
and arguments as the ``torchrun`` command (printed before it starts), without a process in
between. So a signal sent to ``sgtm train`` reaches the agent exactly once, and there is no
intermediate process to leave behind when the launcher is killed.

What this adds to torchrun:
- **Preempt signals** (``resilience.preempt_signals``) are taken out of torchrun's own handling.
  On the first one the agent passes it to every worker, waits up to
  ``resilience.stop_grace_s`` for them to finish the step and save, then stops (torchrun's
  ``SignalException``: no ``--max-restarts`` restart for a preemption). Further copies of the
  signal are ignored, so a signal sent to the whole job cannot cut the save short.
- **Exit statuses**: 0 done; the workers' own status when one of ours is the only one among
  the failed ranks (2 bad input, 3 non-finite loss, 4 hang, 75 preempted), since the ranks
  stopped with them exit 1 or by a signal; 128+N after another signal N; 1 otherwise.
  The workers' exit statuses are read with ``waitid(WNOWAIT)``, which leaves them for
  torchrun to collect.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import EXIT_PREEMPTED

# torchrun's default --signals-to-handle; preempt signals are removed from it.
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
# Worker statuses passed through unchanged when every failed worker reports the same one.
KNOWN_STATUSES = {2: "bad input", 3: "non-finite loss", 4: "a rank hung",
                  EXIT_PREEMPTED: "preempted"}


@dataclass
class LaunchPlan:
    nproc_per_node: int
    train_args: list[str]  # --config X.yaml key=value ...
    nnodes: int = 1
    rdzv_endpoint: Optional[str] = None  # None: --standalone (this machine, a free port)
    rdzv_id: Optional[str] = None
    max_restarts: int = 0
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    stop_grace_s: float = 300.0
    threads: int = 1  # OMP_NUM_THREADS for the workers unless the environment sets it

    def torchrun_args(self) -> list[str]:
        if self.rdzv_endpoint is None:
            where = ["--standalone"]
        else:
            where = [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={self.rdzv_endpoint}",
                     f"--rdzv-id={self.rdzv_id or 'sgtm'}"]
        handled = ",".join(s for s in TORCHRUN_SIGNALS if s not in self.preempt_signals)
        return [*where, f"--nproc-per-node={self.nproc_per_node}",
                f"--max-restarts={self.max_restarts}", f"--signals-to-handle={handled}",
                "-m", "megatron_sgtm.train", *self.train_args]


def _worker_pids() -> list[int]:
    """This process's children started by torchrun (they carry TORCHELASTIC_RUN_ID)."""
    me, out = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[-1].split()[1]) != me:
                continue
            if b"TORCHELASTIC_RUN_ID=" in (entry / "environ").read_bytes():
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


def _exit_status(pid: int) -> Optional[int]:
    """The exit status of child ``pid`` if it has ended (negative: killed by that signal),
    without reaping it; None while it runs or when it cannot be read."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


class _Stopper:
    """The agent's handler for preempt signals (installed in the main thread only)."""

    def __init__(self, names: list[str], grace_s: float) -> None:
        self.signals = [int(getattr(signal, n)) for n in names]
        self.grace_s = grace_s
        self.signum: Optional[int] = None
        self.statuses: dict[int, Optional[int]] = {}
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, _frame) -> None:
        if self.signum is not None:
            return  # a second copy (the job, the worker, the batch system): already stopping
        from torch.distributed.elastic.multiprocessing.api import SignalException

        self.signum = signum
        name = signal.Signals(signum).name
        workers = _worker_pids()
        os.write(2, f"sgtm train: got {name}; {len(workers)} worker(s) finish their step and "
                    f"save (waiting up to {self.grace_s:g} s)\n".encode())
        for pid in workers:  # the workers only: their helper processes are theirs to stop
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace_s
        pending = set(workers)
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                status = _exit_status(pid)
                if status is not None:
                    self.statuses[pid] = status
                    pending.discard(pid)
            time.sleep(0.05)
        for pid in pending:
            self.statuses[pid] = None  # still running: torchrun kills it next
        raise SignalException(f"stopping after {name}", sigval=signal.Signals(signum))

    def outcome(self, sigval: int) -> int:
        say = _say
        if self.signum is None:  # a signal torchrun handled itself (e.g. Ctrl-C)
            say(f"stopped by {signal.Signals(sigval).name}; the last checkpoint is kept")
            return 128 + int(sigval)
        bad = {pid: s for pid, s in self.statuses.items() if s != EXIT_PREEMPTED}
        if not bad:
            return EXIT_PREEMPTED
        detail = ", ".join(f"PID {pid} " + ("did not stop in time" if s is None else
                                            f"exited with status {s}")
                           for pid, s in sorted(bad.items()))
        say(f"error: after {signal.Signals(self.signum).name} not every worker saved and "
            f"stopped: {detail} (resilience.stop_grace_s={self.grace_s:g})")
        return 1


def _say(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


def _failed_status(failures: dict) -> int:
    """One status for a failed worker group. A status of ours (2, 3, 4, 75) wins when it is the
    only one: the ranks that merely stopped with the failing one exit 1 or by a signal."""
    statuses = {rank: f.exitcode for rank, f in failures.items()}
    ours = {s for s in statuses.values() if s in KNOWN_STATUSES}
    if len(ours) == 1:
        status = ours.pop()
        others = sorted(r for r, s in statuses.items() if s != status)
        if others:  # the failing rank printed its own error line
            _say(f"sgtm train: status {status} ({KNOWN_STATUSES[status]}) from rank(s) "
                 f"{sorted(r for r, s in statuses.items() if s == status)}; rank(s) {others} "
                 "stopped with them")
        return status
    detail = ", ".join(f"rank {rank} " + (f"exited with status {s}" if s >= 0
                                          else f"was killed by {signal.Signals(-s).name}")
                       for rank, s in sorted(statuses.items()))
    _say(f"error: training failed: {detail} (see the output above)")
    return 1


def run_agent(plan: LaunchPlan) -> int:
    """Run torchrun's agent for ``plan`` in this process; returns the exit status."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(plan.torchrun_args())
    saved_env = dict(os.environ)
    # Workers tell this process about a preempt signal that reached them alone (preempt.py).
    os.environ["SGTM_LAUNCHER_PID"] = str(os.getpid())
    os.environ.setdefault("OMP_NUM_THREADS", str(plan.threads))
    if plan.max_restarts > 0:
        # torch shares the rendezvous TCPStore with the workers but keeps it across restarts
        # without a per-attempt prefix, so a restarted group reads the previous attempt's
        # addresses and fails to connect (pytorch/pytorch#135712; still so in torch 2.13).
        # Unshared, rank 0 hosts a fresh store for every attempt.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    stopper = _Stopper(plan.preempt_signals, plan.stop_grace_s)
    torch_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM,
                                                       signal.SIGHUP, signal.SIGQUIT)}
    stopper.install()
    try:
        torchrun.run(args)
        return 0
    except ChildFailedError as exc:
        return _failed_status(exc.failures)
    except SignalException as exc:
        return stopper.outcome(exc.sigval)
    finally:
        stopper.restore()
        if threading.current_thread() is threading.main_thread():
            for signum, handler in torch_handlers.items():  # torchrun installs its own
                if handler is not None:
                    signal.signal(signum, handler)
        os.environ.clear()
        os.environ.update(saved_env)
