"""A run whose checkpoint already reached ``train.steps`` is complete: say so, with the final
metrics stored in that checkpoint, and train nothing (exit 0). Requeued jobs and re-run
commands land here."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


def complete_message(step: int, steps: int, metrics: Optional[dict], where: str) -> str:
    metrics = metrics or {}
    loss = metrics.get("loss")
    parts = [f"final loss {loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss)
             else "final loss not stored (checkpoint written before metrics were)"]
    parts += [f"{k}={v:.4f}" for k, v in sorted((metrics.get("eval") or {}).items())]
    past = f" (train.steps is {steps})" if step > steps else ""
    return (f"already complete: {where} holds step {step}{past}; {', '.join(parts)}; "
            "nothing to train")


def stored_completion(checkpoint_dir: str, steps: int) -> Optional[str]:
    """The completion message when ``checkpoint_dir``'s latest checkpoint is at or past
    ``steps``, else None. Reads metadata only."""
    from .. import checkpoint as ck

    root = Path(checkpoint_dir)
    latest = ck.latest_checkpoint(root) if checkpoint_dir and root.exists() else None
    if latest is None:
        return None
    try:
        meta = ck.read_metadata(latest)
    except ck.CheckpointError:
        return None  # not readable as complete: resuming reports the precise problem
    step = int(meta.get("step", 0))
    if step < steps:
        return None
    return complete_message(step, steps, (meta.get("extra") or {}).get("metrics"), str(latest))
