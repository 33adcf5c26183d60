"""RMU (Li et al. 2024), the post-hoc unlearning baseline (SGTM.md section 6).

On forget data, push the layer-``layer`` residual stream toward ``c * u`` for a fixed random
unit vector ``u``; on retain data keep it equal to the frozen model's:
``MSE(h(x_f), c u) + alpha * MSE(h(x_r), h_frozen(x_r))``. Only the MLPs of layers
``layer-2 .. layer`` (0-based indices into ``model.decoder.layers``) are updated; the frozen
activations come from the same model with the original MLP tensors swapped in
(``torch.func.functional_call``), so no second model is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .common import as_batch, positions


@dataclass
class RMUConfig:
    layer: int = 7
    steering_coeff: float = 20.0
    alpha: float = 100.0
    lr: float = 5e-5
    steps: int = 250
    batch_size: int = 4
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.layer < 0:
            out.append(f"rmu.layer: must be >= 0, got {self.layer}")
        for name in ("steps", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                out.append(f"rmu.{name}: must be positive, got {getattr(self, name)}")
        return out


class _Stop(Exception):
    """Raised by the capture hook: nothing after the steered layer is needed."""


def updated_param_names(model, layer: int) -> list[str]:
    n = len(model.decoder.layers)
    if not 0 <= layer < n:
        raise ValueError(f"rmu.layer {layer} is outside the model's layers 0..{n - 1}")
    first = max(0, layer - 2)
    return [name for name, _ in model.named_parameters()
            if any(name.startswith(f"decoder.layers.{i}.mlp.") for i in range(first, layer + 1))]


def _activations(model, tokens, layer: int, params=None) -> torch.Tensor:
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = model.decoder.layers[layer].register_forward_hook(hook)
    try:
        if params is None:
            model(tokens, positions(tokens), None)
        else:
            torch.func.functional_call(model, params, (tokens, positions(tokens), None),
                                       strict=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]  # [s, b, hidden], replicated over TP ranks


def rmu_unlearn(model, forget_train: Iterator, retain_train: Iterator,
                cfg: RMUConfig = RMUConfig(), log=None) -> list[dict]:
    """Update the model in place; returns the loss history."""
    if cfg.problems():
        raise ValueError("; ".join(cfg.problems()))
    names = updated_param_names(model, cfg.layer)
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in names)
    originals = {name: named[name].detach().clone() for name in names}
    hidden = model.core.model.hidden_size
    gen = torch.Generator().manual_seed(cfg.seed)
    u = torch.rand(hidden, generator=gen)
    control = (cfg.steering_coeff * u / u.norm()).to(next(model.parameters()).device)
    opt = torch.optim.AdamW([named[n] for n in names], lr=cfg.lr, weight_decay=0.0)
    history = []
    model.train()
    for step in range(cfg.steps):
        f, r = as_batch(next(forget_train)), as_batch(next(retain_train))
        with torch.no_grad():
            frozen_r = _activations(model, r.tokens, cfg.layer, originals)
        h_f = _activations(model, f.tokens, cfg.layer)
        h_r = _activations(model, r.tokens, cfg.layer)
        forget_loss = F.mse_loss(h_f, control.expand_as(h_f))
        retain_loss = F.mse_loss(h_r, frozen_r)
        loss = forget_loss + cfg.alpha * retain_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step + 1, "forget_mse": forget_loss.item(),
                        "retain_mse": retain_loss.item()})
        if log and (step + 1) % 25 == 0:
            log(f"rmu step {step + 1}: forget mse {float(forget_loss):.4f}, "
                f"retain mse {float(retain_loss):.6f}")
    for p in model.parameters():
        p.requires_grad_(True)
    return history
