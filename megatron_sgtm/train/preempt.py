"""Preemption in a training process: catch the signal, let every rank stop at the same step.

A preempt signal (``resilience.preempt_signals``; SLURM sends SIGTERM at the wall time and
``--signal=USR1@120`` two minutes before) only sets a flag. The loop keeps going until the
next agreement point, where one all-reduce of two integers (the signal, and whether rank 0
lost the checkpoint-directory lock) over every rank decides: ranks that got the signal late,
or not at all, stop at the same step as the first. That rank then saves a checkpoint and the
process exits 75.

The all-reduce runs on a gloo group with CPU tensors, so on GPUs it costs no device sync: one
round trip between hosts per check (``resilience.stop_check_every`` steps; see
``bench/stop_check.py`` for its cost next to a step).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional


def signal_numbers(names: list[str]) -> list[int]:
    return [int(getattr(signal, name)) for name in names]


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """Installs the handlers (main thread only); ``agree`` is collective over every rank."""

    def __init__(self, signals: list[int], check_every: int, rank: int) -> None:
        self.signum: Optional[int] = None
        self.signals = list(signals)
        self.check_every = check_every
        self.rank = rank
        self._previous: dict[int, object] = {}
        self._group = None
        self._group_ready = False
        # Installed as early as the entry point can (before the seconds of imports and model
        # building), so a signal then is not fatal: it stops the run after its first step.
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            # os.write: print() may not be re-entered from a handler.
            os.write(2, f"rank {self.rank}: got {signal_name(signum)}; will save a checkpoint "
                        "and stop after the current step\n".encode())
        launcher = os.environ.get("SGTM_LAUNCHER_PID")
        if signum != signal.SIGTERM and launcher and launcher.isdigit() and \
                int(launcher) == os.getppid():
            # Tell the launcher too, so it stops the group instead of restarting it when our
            # exit status comes back (it ignores the signal if it got it already). Not for
            # SIGTERM: torchrun itself sends that to stop workers before a restart.
            try:
                os.kill(int(launcher), signum)
            except ProcessLookupError:
                pass

    def agree(self, step: int, lock_lost: bool = False, force: bool = False
              ) -> tuple[Optional[int], bool]:
        """(signal any rank got, whether rank 0 lost the lock), the same on every rank.

        Checked every ``check_every`` steps, or now with ``force``; otherwise (None, False)."""
        if not force and step % self.check_every:
            return None, False
        import torch
        import torch.distributed as dist

        flags = torch.tensor([self.signum or 0, int(lock_lost)], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            if not self._group_ready:
                # Collective, and every rank reaches its first check at the same step. gloo
                # keeps the check off the GPU under NCCL.
                self._group = (None if dist.get_backend() == "gloo"
                               else dist.new_group(backend="gloo"))
                self._group_ready = True
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        signum, lost = int(flags[0]), bool(flags[1])
        return (signum or None), lost

    def close(self) -> None:
        """Restore the previous handlers; after a stop, ignore further preempt signals instead
        (the process is on its way out with status 75, which a late copy must not change)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self.signum else handler)
        self._previous = {}
