"""Hidden and embedding dropout whose masks do not depend on the layout.

torch's and megatron's dropout draw from a generator each rank advances on its own: a mask
then depends on which layers and micro-batches that rank ran before (the pipeline stage), and
DP ranks seeded alike draw the same masks for different samples. Here the mask of one
sequence at one site is drawn from a stream keyed by

    (seed, global layer, site, the sequence's global position in the data order)

in the sequence's global ``[s, h]`` shape; a sequence-parallel rank takes its rows. So every
TP, SP, PP, VP and DP layout, and a recomputed forward, drops the same entries. The sites are
the embedding output and the two residual branches of every block (megatron's
bias-dropout-add). The training loop enters each micro-batch's positions with ``keyed``;
a training-mode forward with dropout and no positions is an error.

Attention-probability dropout (``model.attention_dropout``) stays inside the fused
attention kernel, which draws it from the device generator: the one layout-dependent draw.
A layout-free mask there would be a ``[b, heads, s, s]`` tensor per layer, which is the
memory flash attention exists to avoid.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

_state = threading.local()
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class DropoutKeys:
    """One micro-batch: each sequence's global position, the full sequence length and, under
    sequence parallelism, (TP rank, TP size)."""

    positions: tuple[int, ...]
    seq_length: int
    sequence_shard: Optional[tuple[int, int]] = None

    def rows(self, local_length: int) -> tuple[int, int]:
        """The global sequence rows an activation of ``local_length`` positions holds."""
        if local_length == self.seq_length:
            return 0, local_length
        if self.sequence_shard is not None:
            rank, size = self.sequence_shard
            if local_length * size == self.seq_length:
                return rank * local_length, (rank + 1) * local_length
        raise ValueError(f"dropout on {local_length} positions matches neither the sequence "
                         f"({self.seq_length}) nor its sequence-parallel slice")


def current() -> Optional[DropoutKeys]:
    return getattr(_state, "keys", None)


@contextlib.contextmanager
def reenter(keys: Optional[DropoutKeys]):
    """Make ``keys`` current (activation recompute re-runs a forward inside backward)."""
    previous = current()
    _state.keys = keys
    try:
        yield keys
    finally:
        _state.keys = previous


def keyed(positions: Optional[Sequence[int]], seq_length: int,
          sequence_shard: Optional[tuple[int, int]] = None):
    """The dropout keys of the micro-batch whose forward runs inside the block."""
    keys = None if positions is None else DropoutKeys(
        tuple(int(p) for p in positions), int(seq_length), sequence_shard)
    return reenter(keys)


def site_seed(seed: int, layer: int, site: str) -> int:
    digest = hashlib.blake2b(f"sgtm-dropout/{seed}/{layer}/{site}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap bijective scramble of 64 bits."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keep_mask(site: int, keys: DropoutKeys, local_length: int, width: int, p: float,
              device) -> torch.Tensor:
    """``[local_length, b, width]`` booleans, True where the entry is kept."""
    lo, hi = keys.rows(local_length)
    masks = []
    for position in keys.positions:
        gen = torch.Generator(device=device)
        gen.manual_seed(_mix(site ^ _mix(position)) & ((1 << 63) - 1))
        draw = torch.rand((keys.seq_length, width), generator=gen, device=device)
        masks.append(draw[lo:hi] >= p)
    return torch.stack(masks, dim=1)


def keyed_dropout(x: torch.Tensor, p: float, site: int) -> torch.Tensor:
    """Dropout of a ``[s, b, h]`` activation with this micro-batch's keyed mask."""
    keys = current()
    if keys is None:
        raise RuntimeError("dropout in training needs each micro-batch's sample positions "
                           "(dropout.keyed); train through megatron_sgtm.train's step, or set "
                           "model.dropout: 0")
    if len(keys.positions) != x.shape[1]:
        raise ValueError(f"{len(keys.positions)} sample positions for a micro-batch of "
                         f"{x.shape[1]} sequences")
    mask = keep_mask(site, keys, x.shape[0], x.shape[2], p, x.device)
    return x * mask.to(x.dtype) * (1.0 / (1.0 - p))


class KeyedDropout(torch.nn.Module):
    """The embedding output's dropout (replaces megatron's ``torch.nn.Dropout``)."""

    def __init__(self, p: float, site: int):
        super().__init__()
        self.p, self.site = p, site

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return keyed_dropout(x, self.p, self.site)


class KeyedBiasDropoutAdd:
    """megatron's bias-dropout-add with the keyed mask; megatron's own (fused on GPU) when
    nothing is dropped. The layer spec builds one per residual branch; ``bind_dropout``
    gives it its site."""

    site: int = 0

    def __call__(self, training: bool, fused: bool):
        plain = get_bias_dropout_add(training, fused)

        def bias_dropout_add(x_with_bias, residual, prob):
            if not training or prob == 0.0:
                return plain(x_with_bias, residual, prob)
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
            return residual + keyed_dropout(x, prob, self.site)

        return bias_dropout_add


def bind_dropout(model, seed: int) -> None:
    """Give every dropout site of a model chunk its stream (global layer numbers)."""
    if model.pre_process:
        p = model.embedding.embedding_dropout.p
        model.embedding.embedding_dropout = KeyedDropout(p, site_seed(seed, -1, "embedding"))
    for layer in model.decoder.layers:
        index = layer.layer_number - 1
        for name in ("self_attn_bda", "mlp_bda"):
            bda = getattr(layer, name)
            if isinstance(bda, KeyedBiasDropoutAdd):
                bda.site = site_seed(seed, index, name)
