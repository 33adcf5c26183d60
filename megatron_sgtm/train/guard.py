"""What a training process does about the cluster around it, in one object for the loop:

- the checkpoint-directory lock (rank 0 holds it; ``runlock.py``);
- preempt signals and the all-rank agreement to stop (``preempt.py``);
- the hang watchdog (``watchdog.py``).

The loop calls ``beat`` where it makes progress, ``should_stop`` after every step and
saves inside ``saving``; both of the latter are collective.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Optional

from .config import ExperimentConfig
from .errors import TrainError
from .preempt import StopRequest, signal_name, signal_numbers
from .runlock import LockHeld, RunLock
from .watchdog import Watchdog


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _broadcast_from_rank0(value):
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop_request(cfg: ExperimentConfig, rank: int) -> StopRequest:
    """Install the preempt-signal handlers (no process group needed)."""
    res = cfg.resilience
    return StopRequest(signal_numbers(res.signal_names()), res.stop_check_every, rank)


class RunGuard:
    """``RunGuard.open(cfg, rank)`` (collective) or ``RunGuard.inactive()``; a context manager."""

    def __init__(self, lock: Optional[RunLock], stop: Optional[StopRequest],
                 watchdog: Optional[Watchdog]) -> None:
        self.lock, self.stop, self.watchdog = lock, stop, watchdog
        self.stop_signal: Optional[int] = None

    @classmethod
    def open(cls, cfg: ExperimentConfig, rank: int,
             stop: Optional[StopRequest] = None) -> "RunGuard":
        """Collective. ``stop``: the handlers the entry point installed early (else now)."""
        res = cfg.resilience
        stop = stop or stop_request(cfg, rank)
        lock, error = None, None
        if rank == 0 and cfg.checkpoint.dir:
            try:
                lock = RunLock.acquire(Path(cfg.checkpoint.dir), res.lock_heartbeat_s,
                                       res.lock_stale_s, warn=_warn)
            except (LockHeld, OSError) as exc:
                error = str(exc)
        # Every rank learns whether rank 0 got the lock, so all of them stop together.
        error = _broadcast_from_rank0(error)
        if error:
            stop.close()
            raise TrainError(error)
        release = lock.release_file if lock is not None else None
        return cls(lock, stop, Watchdog(res.hang_timeout_s, rank, before_exit=release))

    @classmethod
    def inactive(cls) -> "RunGuard":
        """No lock, no signal handlers, no watchdog: for in-process callers such as tests."""
        return cls(None, None, None)

    def __enter__(self) -> "RunGuard":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def beat(self, step: int, doing: str = "training") -> None:
        if self.watchdog is not None:
            self.watchdog.beat(step, doing)

    def _agree(self, step: int, force: bool) -> Optional[int]:
        if self.stop is None:
            return None
        lost = self.lock.lost if self.lock is not None else None
        signum, any_lost = self.stop.agree(step, lock_lost=lost is not None, force=force)
        if any_lost:
            raise TrainError(f"{lost or 'another run took checkpoint.dir'}; stopping without "
                             "saving, so that two runs never write into one directory")
        return signum

    def should_stop(self, step: int) -> bool:
        """After a step: did any rank get a preempt signal? (Collective, every N steps.)"""
        signum = self._agree(step, force=False)
        if signum is not None:
            self.stop_signal = signum
        return signum is not None

    @contextlib.contextmanager
    def saving(self, step: int):
        """Around a checkpoint save (collective): refuse it if another run has taken the
        directory over; hold preempt signals until it is written (they stop the run after
        the save anyway). Processes the save starts (megatron's writer manager) inherit the
        blocked signals, so a signal sent to every process of a job cannot kill them mid-save."""
        self._agree(step, force=True)
        self.beat(step, "saving a checkpoint")
        held = set(self.stop.signals) if self.stop is not None else set()
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            yield
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
            self.beat(step, "saved a checkpoint")

    @property
    def stop_signal_name(self) -> Optional[str]:
        return signal_name(self.stop_signal) if self.stop_signal else None

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        if self.stop is not None:
            self.stop.close()
        if self.lock is not None:
            self.lock.release()
        self.lock = self.stop = self.watchdog = None
