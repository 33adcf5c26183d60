"""Turn a loader micro-batch into model inputs for the configured method.

- routing methods: the loader's per-token routing labels go to ``route()``;
- filters / no-filter: labels are all 0 (the filters already dropped documents in the loader);
- conditional training: a control token (``<good>``/``<bad>``) opens every sequence;
- SLUNG: flagged (forget-labelled) targets lose their loss, or get an unlikelihood term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..routing import FORGET
from ..transfer import to_device
from ..post.baselines import conditional_tokens, slung_flags, slung_loss
from .config import ROUTING_OF, ExperimentConfig


@dataclass
class ModelInputs:
    tokens: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    routing_labels: Optional[torch.Tensor]  # host tensor, or None when nothing is routed
    slung_flags: Optional[torch.Tensor] = None
    # Each sequence's global position in the data order (keys the dropout masks), or None.
    sample_positions: Optional[torch.Tensor] = None


class InputBuilder:
    def __init__(self, cfg: ExperimentConfig, device: torch.device,
                 control_ids: Optional[tuple[int, int]] = None) -> None:
        self.method = cfg.data.method
        self.routes = ROUTING_OF[self.method] != "none"
        self.slung_mode = cfg.data.slung_mode
        self.device = device
        self.control_ids = control_ids
        if self.method == "conditional" and control_ids is None:
            raise ValueError("conditional training needs the manifest's good_id/bad_id")
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    def _position_ids(self, b: int, s: int) -> torch.Tensor:
        if (b, s) not in self._positions:
            self._positions[(b, s)] = torch.arange(s, device=self.device).expand(b, s).contiguous()
        return self._positions[(b, s)]

    def __call__(self, batch: dict) -> ModelInputs:
        tokens, targets = batch["tokens"], batch["targets"]
        if self.method == "conditional":
            good, bad = self.control_ids
            # Rebuild the full row, prepend the control token, split again: length unchanged.
            full = torch.cat([tokens[:, :1], targets], dim=1)
            per_seq = torch.where((batch["applied_label"] == FORGET).any(dim=1), FORGET, 0)
            full = conditional_tokens(full, per_seq, good, bad)
            tokens, targets = full[:, :-1], full[:, 1:]
        flags = slung_flags(batch["applied_label"]) if self.method == "slung" else None
        labels = batch["routing_labels"] if self.routes else None
        b, s = tokens.shape
        return ModelInputs(
            tokens=to_device(tokens.contiguous(), self.device),
            targets=to_device(targets.contiguous(), self.device),
            position_ids=self._position_ids(b, s),
            routing_labels=labels,
            slung_flags=None if flags is None else to_device(flags, self.device),
            sample_positions=batch.get("sample_position"))

    def loss(self, token_loss: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
        """Mean over the micro-batch's positions.

        Dividing by positions (not by unmasked tokens) keeps every micro-batch's weight equal,
        so DP x accumulation splits of one global batch give the same gradient even when SLUNG
        masks a different number of tokens in each."""
        if inputs.slung_flags is None:
            return token_loss.float().mean()
        total, _ = slung_loss(token_loss.float(), inputs.slung_flags, self.slung_mode)
        return total / token_loss.numel()
