"""Training-time baselines the training loop calls per micro-batch (SGTM.md section 6).

- Conditional training (Korbak et al. 2023): a control token in front of every sequence,
  ``<bad>`` when the classifier flagged it (forget label), ``<good>`` otherwise; generate
  under ``<good>``. Train with routing method 'none'.
- SLUNG (arXiv 2505.03052): flagged tokens stay in context, but their loss is masked, or
  replaced by unlikelihood ``-log(1 - p(target))``.
"""
from __future__ import annotations

import torch

from ..routing import FORGET


def conditional_tokens(tokens: torch.Tensor, applied_label: torch.Tensor | int, good_id: int,
                       bad_id: int) -> torch.Tensor:
    """Prepend the control token to each sequence and drop its last token (length unchanged).

    ``tokens``: ``[L]`` or ``[b, L]`` (the sample including its final target). ``applied_label``:
    a label per sequence (scalar / ``[b]``) or per token (``[b, L]``/``[L]``); a sequence with
    any forget-labelled token gets ``bad_id``. Apply before splitting into inputs/targets."""
    single = tokens.dim() == 1
    toks = tokens.unsqueeze(0) if single else tokens
    label = torch.as_tensor(applied_label, device=toks.device)
    if label.dim() == 0:
        label = label.expand(toks.shape[0])
    elif label.dim() == toks.dim() and label.shape == toks.shape:
        label = torch.where((label == FORGET).any(dim=-1), FORGET, 0)
    elif single and label.dim() == 1:
        label = torch.where((label == FORGET).any(), FORGET, 0).reshape(1)
    if label.shape != (toks.shape[0],):
        raise ValueError(f"applied_label shape {tuple(label.shape)} does not fit tokens "
                         f"{tuple(tokens.shape)}")
    control = torch.where(label == FORGET, bad_id, good_id).to(toks.dtype).unsqueeze(1)
    out = torch.cat([control, toks[:, :-1]], dim=1)
    return out.squeeze(0) if single else out


def conditional_labels(labels: torch.Tensor) -> torch.Tensor:
    """Shift per-token labels like ``conditional_tokens`` shifts tokens (control copies the
    first label), so label-driven counters stay aligned."""
    return torch.cat([labels[..., :1], labels[..., :-1]], dim=-1)


def slung_loss(token_loss: torch.Tensor, flagged: torch.Tensor, mode: str = "mask",
               unlikelihood_weight: float = 1.0,
               loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, counted tokens) for a micro-batch under SLUNG.

    ``token_loss`` ``[b, s]`` is the per-token cross-entropy ``-log p(target)`` (the model's
    ``labels=`` output); ``flagged`` marks targets to not learn (applied label == forget).
    'mask' drops their loss; 'unlikelihood' adds ``-log(1 - p)`` for them, computed from the
    same cross-entropy as ``-log(-expm1(-loss))`` (no extra softmax, TP-agnostic)."""
    if mode not in ("mask", "unlikelihood"):
        raise ValueError(f"SLUNG mode must be 'mask' or 'unlikelihood', got {mode!r}")
    flag = flagged.to(token_loss.dtype)
    keep = torch.ones_like(token_loss) if loss_mask is None else loss_mask.to(token_loss.dtype)
    total = (token_loss * (1 - flag) * keep).sum()
    count = ((1 - flag) * keep).sum()
    if mode == "unlikelihood":
        # p -> 1 makes -log(1-p) infinite; clamp the CE so the gradient stays finite.
        ul = -torch.log(-torch.expm1(-token_loss.clamp(min=1e-6)))
        total = total + unlikelihood_weight * (ul * flag * keep).sum()
        count = count + (flag * keep).sum()
    return total, count


def slung_flags(labels: torch.Tensor) -> torch.Tensor:
    """Flag targets whose applied label is forget."""
    return labels == FORGET
