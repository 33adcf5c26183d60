"""The per-micro-batch routing context and the routing rules of each method.

The training loop wraps every micro-batch's forward in ``route(labels)``. Layers read the
active ``TokenRouting`` at forward time and capture it into their autograd context, so the
backward pass never reads a later micro-batch's labels.

Label codes (the shard sidecar uses the same): 0 unlabeled, 1 retain (masked path), 2 forget.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch

from .transfer import to_device

UNLABELED, RETAIN, FORGET = 0, 1, 2
LABEL_NAMES = {UNLABELED: "unlabeled", RETAIN: "retain", FORGET: "forget"}

# Half-open ranges ``(start, stop)`` of the batch dimension: whole sequences.
Spans = tuple[tuple[int, int], ...]

ROW_ROLES = ("proj", "fc2")
COLUMN_ROLES = ("qkv", "fc1")


@dataclass(frozen=True)
class LinearRule:
    """What one linear does under a routing method (SGTM.md sections 2, 3 and 6)."""

    # Row layers: zero the forget-unit input columns for retain-labelled tokens.
    retain_path_zeroing: bool = False
    # Row layers, forget-labelled tokens, retain-unit input columns: "detach" (Gradient
    # Routing) or "zero" (activation masking).
    forget_token_gate: str | None = None
    # SGTM: forget-labelled tokens give no weight/bias gradient to retain units of this linear.
    masked_wgrad: bool = False


def linear_rule(method: str, variant: str, role: str) -> LinearRule:
    if method == "none":
        return LinearRule()
    is_row = role in ROW_ROLES
    gate = None
    if is_row and method == "gradient_routing":
        gate = "detach"
    elif is_row and method == "activation_masking":
        gate = "zero"
    masked = False
    if method == "sgtm":
        masked = {
            "default": True,
            "joint_projection": role in COLUMN_ROLES,
            "joint_attention": role == "fc1",
        }[variant]
    return LinearRule(retain_path_zeroing=is_row, forget_token_gate=gate, masked_wgrad=masked)


def ablated_roles(variant: str) -> tuple[str, ...]:
    """Linears whose forget slices are theta_forget (zeroed by post-ablation)."""
    return {
        "default": ("qkv", "proj", "fc1", "fc2"),
        "joint_projection": ("qkv", "fc1"),
        "joint_attention": ("fc1",),
    }[variant]


@dataclass
class TokenRouting:
    """One micro-batch's labels, flattened in megatron's ``[s, b]`` token order.

    Index sets are computed on the host from host labels, so the step has no device sync.
    """

    labels: torch.Tensor  # [b, s] integer tensor as given by the data loader
    # Take the per-sequence path (seq_masking.py) where the labels allow it; False
    # forces the per-token path everywhere (tests compare the two).
    use_spans: bool = True
    # Sequence parallelism: (TP rank, TP size). Norms, row-layer biases and the embedding see
    # this rank's slice of the sequence, and read the routing of that slice (``for_length``).
    sequence_shard: Optional[tuple[int, int]] = None
    _device_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        labels = self.labels
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
        host = labels.detach().to("cpu", torch.int64)
        bad = ~((host == UNLABELED) | (host == RETAIN) | (host == FORGET))
        if bool(bad.any()):
            raise ValueError(f"labels hold codes other than 0/1/2: {host[bad].unique().tolist()}")
        self.batch, self.seq = host.shape
        flat = host.t().reshape(-1)  # [s, b] order, as megatron's activations
        self._flat = flat
        # Plain bools, not counts: under torch.compile a guard on a bool allows two graphs,
        # a guard on a count would recompile for every new count.
        self.has_forget = bool((flat == FORGET).any())
        self.has_retain = bool((flat == RETAIN).any())
        self.spans = label_spans(host)
        self.local = None
        if self.sequence_shard is not None:
            rank, size = self.sequence_shard
            if self.seq % size:
                raise ValueError(f"sequence length {self.seq} is not divisible by the "
                                 f"sequence-parallel size {size}")
            width = self.seq // size
            self.local = TokenRouting(host[:, rank * width:(rank + 1) * width],
                                      use_spans=self.use_spans)

    def for_length(self, seq: int) -> "TokenRouting":
        """The routing of activations with ``seq`` positions: the whole sequence, or under
        sequence parallelism this rank's slice of it."""
        if seq == self.seq:
            return self
        if self.local is not None and seq == self.local.seq:
            return self.local
        raise ValueError(f"activations with {seq} positions match neither the routed sequence "
                         f"({self.seq}) nor its sequence-parallel slice")

    def prepare(self, device) -> "TokenRouting":
        """Move every per-token tensor to ``device`` now, outside any compiled region."""
        self.forget_index(device)
        self.kept_index(device)
        for label in (RETAIN, FORGET):
            self.token_flags(label, device)
        if self.local is not None:
            self.local.prepare(device)
        return self

    def memo(self, key, make):
        """A host-side value derived from the labels, computed once per micro-batch (plans
        that every layer with the same rule shares)."""
        if key not in self._device_cache:
            self._device_cache[key] = make()
        return self._device_cache[key]

    def _cached(self, key, device, make):
        full = (key, str(device))
        if full not in self._device_cache:
            self._device_cache[full] = to_device(make(), device)
        return self._device_cache[full]

    def token_flags(self, label: int, device) -> torch.Tensor:
        """``[s, b, 1]`` bool: tokens carrying ``label``."""
        return self._cached(("flags", label), device,
                            lambda: (self._flat == label).view(self.seq, self.batch, 1))

    def forget_index(self, device) -> torch.Tensor:
        return self._cached("forget_idx", device,
                            lambda: (self._flat == FORGET).nonzero().squeeze(1))

    def kept_index(self, device) -> torch.Tensor:
        """Tokens whose gradients reach every unit: all but the forget-labelled ones."""
        return self._cached("kept_idx", device,
                            lambda: (self._flat != FORGET).nonzero().squeeze(1))

    def column_mask(self, label: int, columns: tuple[int, ...], width: int, device,
                    invert_columns: bool) -> torch.Tensor:
        """``[s, b, width]`` bool: tokens carrying ``label`` x ``columns`` (or their complement).

        Eager mode caches the mask for every layer with the same columns; a compiled graph
        builds it inline, where it fuses into the masking op and costs no memory."""
        if torch.compiler.is_compiling():
            cols = torch.zeros(width, dtype=torch.bool, device=device)
            cols[list(columns)] = True
            return self.token_flags(label, device) & (~cols if invert_columns else cols)

        def make():
            cols = torch.zeros(width, dtype=torch.bool)
            cols[list(columns)] = True
            if invert_columns:
                cols = ~cols
            tokens = (self._flat == label).view(self.seq, self.batch, 1)
            return tokens & cols

        return self._cached(("cols", label, columns, width, invert_columns), device, make)


def label_spans(labels: torch.Tensor) -> dict[int, Spans] | None:
    """Per label, the maximal runs of consecutive sequences carrying it, when every sequence
    of ``labels`` ([b, s], host) carries one label; None when some sequence mixes labels."""
    if labels.shape[1] and not bool((labels == labels[:, :1]).all()):
        return None
    per_sequence = labels[:, 0].tolist() if labels.shape[1] else [UNLABELED] * labels.shape[0]
    runs: dict[int, list[tuple[int, int]]] = {UNLABELED: [], RETAIN: [], FORGET: []}
    for b, label in enumerate(per_sequence):
        spans = runs[label]
        if spans and spans[-1][1] == b:
            spans[-1] = (spans[-1][0], b + 1)
        else:
            spans.append((b, b + 1))
    return {label: tuple(spans) for label, spans in runs.items()}


_state = threading.local()


def current() -> TokenRouting | None:
    return getattr(_state, "routing", None)


@contextlib.contextmanager
def reenter(routing: TokenRouting | None):
    """Make an existing ``TokenRouting`` current again (activation recompute re-runs a
    micro-batch's forward during backward, after its ``route`` block has ended)."""
    previous = current()
    _state.routing = routing
    try:
        yield routing
    finally:
        _state.routing = previous


@contextlib.contextmanager
def route(labels: torch.Tensor | None, device=None, use_spans: bool = True,
          sequence_shard: Optional[tuple[int, int]] = None):
    """Make ``labels`` ([b, s], codes 0/1/2) the routing for forwards run inside the block.

    Pass ``device`` to move the per-token index tensors there up front (needed under
    torch.compile, harmless otherwise). ``use_spans=False`` forces the per-token path.
    ``sequence_shard``: (TP rank, TP size) under sequence parallelism."""
    previous = current()
    _state.routing = None if labels is None else TokenRouting(
        labels, use_spans=use_spans, sequence_shard=sequence_shard)
    if _state.routing is not None and device is not None:
        _state.routing.prepare(device)
    try:
        yield _state.routing
    finally:
        _state.routing = previous
