"""Step losses kept on the device and read back only when someone needs them.

Reading a GPU loss every step (``float(loss)``) stalls the host until the step's kernels have
finished, so the next step's launches cannot overlap it. ``LossWatch`` keeps the per-step losses
as device tensors and reads them all in one transfer when the loop logs, evaluates, saves or
ends. The data-parallel mean is taken at that point too, in one all-reduce for all pending
steps: every rank calls ``read`` at the same steps, so the collective always matches.

A NaN/inf loss is therefore noticed at the next read, not at its own step. Nothing is lost by
waiting: reads happen before every checkpoint save, so weights updated from a non-finite step
are never written, and the error names the first bad step exactly.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .errors import NonFiniteLoss


class LossWatch:
    def __init__(self, dp_group=None, dp_size: int = 1, checkpoint_dir: str = "",
                 pp_group=None) -> None:
        self.dp_group = dp_group
        # Under pipeline parallelism only the last stage holds the loss (zero elsewhere):
        # a sum over the pipeline group gives every stage the value.
        self.pp_group = pp_group
        self.dp_size = dp_size
        self.checkpoint_dir = checkpoint_dir
        self._steps: list[int] = []
        self._losses: list[torch.Tensor] = []
        self.last: float = float("nan")

    def add(self, step: int, local_loss: torch.Tensor) -> None:
        """Record this rank's loss for ``step`` (1-based), without reading it."""
        self._steps.append(step)
        self._losses.append(local_loss.detach().reshape(()))

    def read(self) -> list[float]:
        """The data-parallel mean loss of every step since the last read (one host sync).

        Raises ``NonFiniteLoss`` naming the first step whose loss is NaN or infinite."""
        if not self._losses:
            return []
        stacked = torch.stack(self._losses).float()
        if self.pp_group is not None:
            dist.all_reduce(stacked, group=self.pp_group)
        if self.dp_size > 1:
            dist.all_reduce(stacked, group=self.dp_group)
            stacked = stacked / self.dp_size
        values = stacked.tolist()
        steps = self._steps
        self._steps, self._losses = [], []
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"loss is {value} at step {step} (seen at step {steps[-1]}); stopping "
                    f"without saving (the last good checkpoint stays in "
                    f"{self.checkpoint_dir or '(none)'}); lower train.lr or check the data")
        self.last = values[-1]
        return values
