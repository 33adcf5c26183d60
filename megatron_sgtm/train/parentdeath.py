"""Workers die with their launcher.

torchrun starts each worker in a session of its own, so ``kill -9`` of the launcher's process
group (a user's ``kill -9 -PGID``, a batch system killing a job step) used to leave the workers
training, and writing checkpoints, without anyone watching. Linux's parent-death signal fixes
that from the worker's side, whatever the launcher: the kernel sends SIGKILL to the worker when
the thread that started it exits. SIGKILL rather than a catchable signal, because the other
ranks may be gone as well: a worker must not start a collective save then.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask for SIGKILL when the parent exits. False where prctl is unavailable (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent == 1 or os.getppid() != parent:
        os._exit(1)  # the launcher died before prctl took effect: nobody would stop us later
    return True
