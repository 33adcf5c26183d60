"""The hang watchdog: a rank that makes no progress for too long ends the job.

The loop reports progress (``beat``) at every step and around evaluation and checkpoint saves.
A daemon thread checks the time since the last beat (from the first one on: start-up, where
the process-group and rendezvous timeouts apply, is not watched); past ``resilience.hang_timeout_s`` it
prints one ``error:`` line naming the rank, host, step and what the rank was doing, and ends
the process with status 4 (``os._exit``: the main thread is stuck, so nothing else can run).
torchrun then stops the other ranks, whose own watchdogs would fire too: they wait in a
collective for the stuck one. gloo's and NCCL's own collective timeouts (30 min and 10 min by
default) would end the job as well, but with a message that names neither the rank nor the
step.

Fault injection for tests (environment, read once):
- ``SGTM_FAULT_HANG=RANK:STEP``: that rank sleeps for ever when it reaches that step;
- ``SGTM_FAULT_STEP_SLEEP=SECONDS``: every rank sleeps that long each step, which gives a
  test time to signal or kill a run mid-way; it changes no result.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable, Optional

from .errors import EXIT_HUNG


def _fault_hang() -> Optional[tuple[int, int]]:
    spec = os.environ.get("SGTM_FAULT_HANG", "")
    rank, _, step = spec.partition(":")
    return (int(rank), int(step)) if rank.isdigit() and step.isdigit() else None


class Watchdog:
    def __init__(self, timeout_s: float, rank: int,
                 before_exit: Optional[Callable[[], None]] = None) -> None:
        self.timeout_s = timeout_s
        self.rank = rank
        self.before_exit = before_exit  # e.g. release the checkpoint.dir lock
        self._last = time.monotonic()
        self._where = "starting"
        self._armed = False  # from the first beat: start-up and compiling are not watched
        self._stop = threading.Event()
        self._hang = _fault_hang()
        self._step_sleep = float(os.environ.get("SGTM_FAULT_STEP_SLEEP", "0") or 0)
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="sgtm-watchdog",
                                            daemon=True)
            self._thread.start()

    def beat(self, step: int, doing: str = "training") -> None:
        """Progress: this rank is at ``step`` (steps done so far), about to do ``doing``."""
        self._last = time.monotonic()
        self._where = f"step {step}, {doing}"
        self._armed = True
        if doing == "training":
            if self._hang == (self.rank, step):
                self._where = f"step {step}, sleeping (SGTM_FAULT_HANG)"
                while True:
                    time.sleep(3600)
            if self._step_sleep:
                time.sleep(self._step_sleep)

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if self._armed and idle > self.timeout_s:
                sys.stderr.write(
                    f"error: rank {self.rank} (host {socket.gethostname()}, PID {os.getpid()}) "
                    f"made no progress for {idle:.0f} s (resilience.hang_timeout_s="
                    f"{self.timeout_s:g}) at {self._where}; ending the job. A rank stuck "
                    "outside a collective hangs the others inside one, so the rank whose "
                    "place differs is the likely cause\n")
                sys.stderr.flush()
                if self.before_exit is not None:
                    try:
                        self.before_exit()
                    except Exception:  # nothing may keep a hung process alive
                        pass
                os._exit(EXIT_HUNG)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
