"""Workers die with their launcher, and their helper processes with them.

torchrun starts each worker in a session of its own, so ``kill -9`` of the launcher's process
group (a user's ``kill -9 -PGID``, a batch system killing a job step) used to leave the workers
training, and writing checkpoints, without anyone watching. Linux's parent-death signal fixes
that from the worker's side, whatever the launcher: the kernel sends SIGKILL to the worker when
the thread that started it exits. SIGKILL rather than a catchable signal, because the other
ranks may be gone as well: a worker must not start a collective save then.

A worker has children of its own: megatron's checkpoint writer starts a ``multiprocessing``
manager process at the first save. A worker killed with SIGKILL cannot stop it, and it would
live on, holding the launcher's output pipe open (``sgtm train | tee log`` would never end).
The parent-death signal is not inherited, so the worker uses the kernel's other rule instead:
when a session leader with a controlling terminal exits, every process of the terminal's
foreground group gets SIGHUP. The worker (a session leader under torchrun) takes a
pseudo-terminal that nothing reads as its controlling terminal; its helpers are in its group.
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


_TERMINAL: list[int] = []  # the pseudo-terminal's fds, open for the life of the process


def helpers_die_with_me() -> bool:
    """Make this session leader's process group get SIGHUP when it exits (see above).
    False where that cannot be arranged (not a session leader, no pty, not Linux)."""
    if not sys.platform.startswith("linux") or os.getsid(0) != os.getpid() or _TERMINAL:
        return bool(_TERMINAL)
    try:
        import fcntl
        import termios

        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    except OSError:
        return False
    _TERMINAL.extend([master, slave])
    return True
