"""Errors the training entry points turn into one clear message and a non-zero exit."""
from __future__ import annotations


class TrainError(Exception):
    """Bad input to training (data, checkpoint, config at run time): exit code 2."""

    exit_code = 2


class NonFiniteLoss(TrainError):
    """The loss became NaN/inf: exit code 3, nothing saved after it."""

    exit_code = 3
