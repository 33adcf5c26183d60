"""Errors the training entry points turn into one clear message and a non-zero exit, and the
exit statuses a launcher or an sbatch script acts on.

| status | meaning |
|---|---|
| 0 | trained to ``train.steps``, or the run was already complete |
| 1 | an unexpected error (a traceback was printed) |
| 2 | bad input: config, data, checkpoint, a checkpoint.dir held by another run |
| 3 | the loss became non-finite (nothing saved after it) |
| 4 | a rank made no progress for ``resilience.hang_timeout_s`` (watchdog) |
| 75 | preempted: a preempt signal arrived, a checkpoint was saved; requeue to continue |
"""
from __future__ import annotations

EXIT_HUNG = 4
# 75 is EX_TEMPFAIL in sysexits.h: "temporary failure; the user is invited to retry".
EXIT_PREEMPTED = 75


class TrainError(Exception):
    """Bad input to training (data, checkpoint, config at run time): exit code 2."""

    exit_code = 2


class NonFiniteLoss(TrainError):
    """The loss became NaN/inf: exit code 3, nothing saved after it."""

    exit_code = 3
