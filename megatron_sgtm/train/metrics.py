"""Training metrics: SGTM label counters, and the rank-0 sinks (JSON lines, wandb, tqdm).

Counters accumulate on the host from the batch's host tensors (the data loader builds them on
the CPU), so counting never syncs a GPU.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..routing import LABEL_NAMES

TRUTH_NAMES = {0: "retain", 1: "forget", 2: "adjacent"}


class LabelCounters:
    """Tokens per applied label, and true-domain -> applied-label token counts."""

    def __init__(self) -> None:
        self.applied = torch.zeros(3, dtype=torch.int64)
        self.confusion = torch.zeros(3, 3, dtype=torch.int64)  # [true, applied]

    def add(self, batch: dict) -> None:
        applied = batch["applied_label"].reshape(-1).to("cpu", torch.int64)
        truth = batch["true_domain"].reshape(-1).to("cpu", torch.int64)
        self.applied += torch.bincount(applied, minlength=3)[:3]
        self.confusion += torch.bincount(truth * 3 + applied, minlength=9)[:9].view(3, 3)

    def state_dict(self) -> dict:
        return {"applied": self.applied.tolist(), "confusion": self.confusion.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.applied = torch.tensor(state["applied"], dtype=torch.int64)
        self.confusion = torch.tensor(state["confusion"], dtype=torch.int64)

    def reduced(self, group=None) -> dict:
        """Counts summed over data-parallel ranks (a collective: every DP rank calls it)."""
        import torch.distributed as dist

        from ..parallel import collective_device

        flat = torch.cat([self.applied, self.confusion.reshape(-1)])
        if dist.is_initialized() and group is not None and dist.get_world_size(group) > 1:
            # The counts live on the host (no device sync per step); NCCL reduces only device
            # tensors, so they visit the GPU for the sum, at log time only.
            device = collective_device(group)
            summed = flat.to(device)
            dist.all_reduce(summed, group=group)
            flat = summed.cpu()
        applied, confusion = flat[:3].tolist(), flat[3:].view(3, 3).tolist()
        out = {f"tokens/{LABEL_NAMES[i]}": applied[i] for i in range(3)}
        for t in range(3):
            for a in range(3):
                out[f"true_{TRUTH_NAMES[t]}->{LABEL_NAMES[a]}"] = confusion[t][a]
        return out


class _NoWandb:
    def log(self, *_args, **_kwargs):
        pass

    def finish(self):
        pass


def _wandb_run(mode: str, project: str, name: str, config: dict, run_dir: Optional[Path]):
    if mode == "off":
        return _NoWandb()
    try:
        import wandb
    except ImportError:
        print("wandb is not installed; logging to the metrics file only", file=sys.stderr)
        return _NoWandb()
    try:
        return wandb.init(project=project, name=name or None, config=config, mode=mode,
                          dir=str(run_dir) if run_dir else None, resume="allow")
    except Exception as exc:  # a logging sink must never stop training
        print(f"wandb init failed ({exc}); logging to the metrics file only", file=sys.stderr)
        return _NoWandb()


class MetricsSink:
    """Rank 0 writes; other ranks hold a sink that does nothing."""

    def __init__(self, active: bool, run_dir: Optional[str], wandb_mode: str, project: str,
                 run_name: str, config: dict, progress: bool, total_steps: int,
                 start_step: int) -> None:
        self.active = active
        self.file = None
        self.bar = None
        self.wandb = _NoWandb()
        if not active:
            return
        if run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            # Append: a resumed run continues the same file (lines carry their step).
            self.file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
        self.wandb = _wandb_run(wandb_mode, project, run_name, config,
                                Path(run_dir) if run_dir else None)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self._last = (time.perf_counter(), 0)

    def step(self, step: int, tokens_seen: int, loss: Optional[float] = None) -> None:
        """Advance the progress bar (cheap; called every step)."""
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.perf_counter()
        t0, tok0 = self._last
        if now - t0 > 1.0:
            self.bar.set_postfix(tok_s=f"{(tokens_seen - tok0) / (now - t0):,.0f}",
                                 **({} if loss is None else {"loss": f"{loss:.3f}"}))
            self._last = (now, tokens_seen)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        self.wandb.finish()
