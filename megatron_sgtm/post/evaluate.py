"""Held-out evaluation: mean next-token loss and accuracy per split, per-token loss summary.

Losses are token-weighted means over positions whose loss mask is set. Under tensor
parallelism every TP rank computes the same numbers (the cross-entropy and the argmax are
combined over the vocabulary shards), so rank 0 can report them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .common import batches, frozen, logits, loss_from_logits, vocab_parallel_argmax

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class EvalError(ValueError):
    """Evaluation cannot produce a number (e.g. an empty split)."""


@dataclass
class SplitResult:
    split: str
    loss: float
    accuracy: float
    tokens: int
    calibrated: bool = False
    # Filled when per-token losses were kept (the forget split).
    distribution: Optional[dict] = None

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@torch.no_grad()
def split_token_losses(model, items: Iterable, logit_bias: Optional[torch.Tensor] = None,
                       keep: bool = False) -> tuple[float, int, int, Optional[np.ndarray]]:
    """(summed loss, correct predictions, counted tokens, per-token losses if ``keep``)."""
    total, correct, count, kept = 0.0, 0, 0, []
    with frozen(model):
        for batch in batches(items):
            vp = logits(model, batch.tokens)
            loss = loss_from_logits(vp, batch.targets, logit_bias)
            if logit_bias is not None:
                vp = vp + logit_bias
            hit = (vocab_parallel_argmax(vp) == batch.targets).float()
            mask = batch.mask().to(loss.device)
            total += float((loss * mask).sum())
            correct += int((hit * mask).sum())
            count += int(mask.sum())
            if keep:
                kept.append(loss[mask.bool()].float().cpu().numpy())
    losses = np.concatenate(kept) if keep and kept else None
    return total, correct, count, losses


def loss_distribution(losses: np.ndarray, bins: Sequence[float] | int = 20) -> dict:
    """Quantiles, mean, and a histogram of per-token losses (in nats)."""
    if losses.size == 0:
        raise EvalError("no tokens to summarise")
    if isinstance(bins, int):
        upper = max(1.0, float(math.ceil(losses.max())))
        bins = np.linspace(0.0, upper, bins + 1)
    counts, edges = np.histogram(losses, bins=np.asarray(bins, dtype=np.float64))
    return {"mean": float(losses.mean()), "std": float(losses.std()),
            "quantiles": {str(q): float(np.quantile(losses, q)) for q in QUANTILES},
            "histogram": {"edges": [float(e) for e in edges], "counts": counts.tolist()},
            "above_range": int((losses > edges[-1]).sum())}


def evaluate_split(model, name: str, items: Iterable, logit_bias: Optional[torch.Tensor] = None,
                   distribution: bool = False) -> SplitResult:
    total, correct, count, losses = split_token_losses(model, items, logit_bias, keep=distribution)
    if count == 0:
        raise EvalError(f"split {name!r} has no evaluation tokens")
    return SplitResult(split=name, loss=total / count, accuracy=correct / count, tokens=count,
                       calibrated=logit_bias is not None,
                       distribution=loss_distribution(losses) if distribution else None)


def evaluate(model, splits: dict[str, Iterable], logit_bias: Optional[torch.Tensor] = None,
             distribution_split: str | None = "forget") -> list[SplitResult]:
    """One result per split, plain and (given a bias) calibrated. ``splits`` values must be
    re-iterable (lists, or objects with ``__iter__`` restarting the data)."""
    out = []
    for bias in (None, logit_bias) if logit_bias is not None else (None,):
        for name, items in splits.items():
            out.append(evaluate_split(model, name, items, bias,
                                      distribution=name == distribution_split and bias is None))
    return out


def format_table(results: list[SplitResult]) -> str:
    lines = [f"{'split':<10} {'calibrated':<10} {'loss':>8} {'accuracy':>9} {'tokens':>9}"]
    for r in results:
        lines.append(f"{r.split:<10} {str(r.calibrated):<10} {r.loss:>8.4f} "
                     f"{r.accuracy:>9.4f} {r.tokens:>9d}")
    for r in results:
        if r.distribution:
            q = r.distribution["quantiles"]
            lines.append(f"per-token loss on {r.split}: mean {r.distribution['mean']:.3f}, "
                         + ", ".join(f"q{float(k) * 100:g} {v:.3f}" for k, v in q.items()))
    return "\n".join(lines)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows atomically enough for one writer: write a temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(old + "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(path)
