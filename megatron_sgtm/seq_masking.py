"""Masking for micro-batches whose sequences each carry one label, without token gathers.

Label-homogeneous packing (the default) gives every sequence one label, so the tokens a rule
treats alike are whole sequences: columns ``x[:, b]`` of megatron's ``[s, b, h]``
activations. Such a column is a strided 2-D matrix that BLAS reads in place. The loader
orders each micro-batch's sequences by label, so each label is a few contiguous spans.

- A weight gradient is one GEMM per sequence allowed to update the whole weight (one GEMM
  in all when that is the whole batch) on views of the activations; each span of sequences
  that may update only the forget units then adds one narrow GEMM into the unit rows or
  columns. The FLOPs never exceed the unmasked GEMM's. A per-sequence GEMM contracts over
  one sequence and, on CPU, runs 3-20% slower per FLOP than one batch-wide GEMM (the most
  for small weights), so skipping a quarter of the batch's share already pays for it.
- A row layer's input gate (retain path, Gradient Routing's detach, activation masking)
  zeroes each gated sequence's switched-off input columns in place for one batch-wide GEMM
  and writes them back bitwise after it (only those entries are copied). Per-sequence
  forward GEMMs run ~30% slower than one batch-wide GEMM for the same FLOPs, and a gated
  copy of the whole input costs a fresh activation-sized buffer. Backward keeps the ungated
  input (no activation memory is added); its weight gradient is the rule above, and its
  input gradient one GEMM whose gated columns are zeroed in place per sequence range.
- Bias and norm-affine gradients are one reduction over the sequence dimension, then sums of
  a few ``[b, n]`` rows.
- Unit slices are strided views where the forget units lie on a grid (one run, or the same
  offsets in equal blocks, as block-strided placement makes them), else index operations.

``masking.py`` holds the per-token path (index sets, boolean masks). It serves micro-batches
that mix labels inside a sequence, and compiled graphs (whose shapes stay dynamic there,
while per-sequence loops would specialise the graph on every label layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from .masking import _custom_bwd, _custom_fwd, column_backward, column_input
from .partition import Runs
from .routing import FORGET, RETAIN, UNLABELED, Spans, TokenRouting

# The weight columns one class of sequences uses in a row layer: all, only the forget units'
# ("units"), or all but them ("others").
ALL, UNITS, OTHERS = "all", "units", "others"


def sequences(spans: Spans) -> Iterator[int]:
    for start, stop in spans:
        yield from range(start, stop)


def merged(spans: Iterable[tuple[int, int]]) -> Spans:
    """Sorted spans with touching ones joined, so equal sets compare equal."""
    out: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return tuple(out)


def complement(runs: Runs, width: int) -> Runs:
    """The runs of ``range(width)`` not covered by ``runs`` (sorted, disjoint)."""
    out, at = [], 0
    for start, stop in runs:
        if start > at:
            out.append((at, start))
        at = stop
    if at < width:
        out.append((at, width))
    return tuple(out)


def without(spans: Spans, removed: Spans) -> Spans:
    """The sequences of ``spans`` not in ``removed`` (both sorted and disjoint)."""
    out = []
    for start, stop in spans:
        for r_start, r_stop in removed:
            if r_stop <= start or r_start >= stop:
                continue
            if r_start > start:
                out.append((start, r_start))
            start = max(start, r_stop)
        if start < stop:
            out.append((start, stop))
    return merged(out)


def grid(runs: Runs, width: int) -> Optional[tuple[int, int, int, int]]:
    """``(blocks, size, start, stop)`` when ``runs`` are the offsets ``[start, stop)`` of each
    of ``blocks`` equal blocks of ``size`` spanning ``width`` (one run is one block), as
    block-strided placement lays out the forget units; else None."""
    if not runs or width % len(runs):
        return None
    size = width // len(runs)
    start, stop = runs[0]
    if stop > size or any((a - j * size, b - j * size) != (start, stop)
                          for j, (a, b) in enumerate(runs)):
        return None
    return len(runs), size, start, stop


class Units:
    """One linear's local forget units (rows of a column layer, input columns of a row layer)
    out of ``width``: their runs, and index and mask tensors cached per device.

    Units laid out on a ``grid`` (one run, or the same offsets in equal blocks, as
    block-strided placement makes them) are reached through strided views that split the
    dimension into ``[blocks, size]``: one zero or copy in memory order, where an index fill
    along the last dimension would touch one cache line per element."""

    def __init__(self, runs: Runs, width: int) -> None:
        self.runs, self.width = tuple(runs), width
        self.others = complement(self.runs, width)
        self.grid = grid(self.runs, width)
        self._cache: dict = {}

    def index(self, device, part: str = UNITS) -> torch.Tensor:
        key = (part, str(device))
        if key not in self._cache:
            runs = self.runs if part == UNITS else self.others
            ids = [i for start, stop in runs for i in range(start, stop)]
            self._cache[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._cache[key]

    def mask(self, device) -> torch.Tensor:
        """``[width]`` booleans, True on the units."""
        key = ("mask", str(device))
        if key not in self._cache:
            flags = torch.zeros(self.width, dtype=torch.bool)
            for start, stop in self.runs:
                flags[start:stop] = True
            self._cache[key] = flags.to(device)
        return self._cache[key]

    def _grid_parts(self, tensor: torch.Tensor, dim: int, part: str) -> list[torch.Tensor]:
        """Views of ``tensor`` holding ``part`` along ``dim``, split into ``[blocks, size]``."""
        blocks, size, start, stop = self.grid
        shape = tensor.shape
        split = tensor.view(*shape[:dim], blocks, size, *shape[dim + 1:])
        if part == UNITS:
            return [split.narrow(dim + 1, start, stop - start)]
        return [split.narrow(dim + 1, a, b - a) for a, b in ((0, start), (stop, size)) if b > a]

    def _views(self, tensor: torch.Tensor, dim: int, part: str) -> Optional[list[torch.Tensor]]:
        """Views of ``tensor`` holding ``part`` along ``dim``; None where the units are
        irregular and only index operations reach them."""
        if not self.runs:
            return [] if part == UNITS else [tensor]
        if self.grid is not None:
            return self._grid_parts(tensor, dim, part)
        return None

    def zero(self, tensor: torch.Tensor, dim: int, part: str) -> torch.Tensor:
        """Zero ``part`` (UNITS or OTHERS) along ``dim`` in place."""
        views = self._views(tensor, dim, part)
        if views is None:
            tensor.index_fill_(dim, self.index(tensor.device, part), 0.0)
        for view in views or ():
            view.zero_()
        return tensor

    def zero_restorably(self, tensor: torch.Tensor, dim: int, part: str) -> Callable[[], None]:
        """``zero`` that first keeps a copy of only the zeroed entries; the returned function
        writes them back, bitwise."""
        views = self._views(tensor, dim, part)
        if views is None:
            index = self.index(tensor.device, part)
            kept = tensor.index_select(dim, index)
            tensor.index_fill_(dim, index, 0.0)
            return lambda: tensor.index_copy_(dim, index, kept)
        kept = [view.clone() for view in views]
        for view in views:
            view.zero_()
        return lambda: [view.copy_(piece) for view, piece in zip(views, kept)]

    def columns(self, t: torch.Tensor) -> torch.Tensor:
        """``t[..., units]`` as a ``[rows, units]`` matrix: a view of a 2-D ``t`` when the
        units are one run, else a copy of only the unit columns."""
        count = sum(stop - start for start, stop in self.runs)
        if len(self.runs) == 1:
            start, stop = self.runs[0]
            return t[..., start:stop].reshape(-1, count)
        if self.grid is not None:
            return self._grid_parts(t, t.dim() - 1, UNITS)[0].reshape(-1, count)
        return t.index_select(-1, self.index(t.device)).reshape(-1, count)

    def write(self, grad: torch.Tensor, dim: int, piece: torch.Tensor,
              accumulate: bool = False) -> None:
        """``grad[units along dim] = piece`` (``+= piece`` when ``accumulate``)."""
        if self.grid is not None:
            view = self._grid_parts(grad, dim, UNITS)[0]
            piece = piece.view(view.shape)
            if accumulate:
                view.add_(piece)
            else:
                view.copy_(piece)
        elif accumulate:
            grad.index_add_(dim, self.index(grad.device), piece)
        else:
            grad.index_copy_(dim, self.index(grad.device), piece)


def _gemm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensors[0].dtype


def _covers(spans: Spans, batch: int) -> bool:
    return spans == ((0, batch),)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _add_sequences(grad: Optional[torch.Tensor], go_seqs, x_seqs, spans: Spans):
    """``grad`` plus ``go_b x_b`` for each sequence ``b`` of ``spans`` (None stays None if
    ``spans`` is empty)."""
    for b in sequences(spans):
        grad = go_seqs[b].mm(x_seqs[b]) if grad is None else grad.addmm_(go_seqs[b], x_seqs[b])
    return grad


def seq_weight_grad(go: torch.Tensor, x: torch.Tensor, wide: Spans, unit: Spans,
                    units: Units, on_rows: bool) -> torch.Tensor:
    """``go^T x`` summed over the tokens allowed to reach each part of the weight: ``wide``
    sequences reach all of it, ``unit`` sequences the forget-unit rows (``on_rows``, column
    layers) or columns (row layers).

    Per-sequence GEMMs on ``[n, s]``/``[s, h]`` views (one GEMM in all where every sequence
    reaches the whole weight): first the sequences that reach all but the units, whose sum has
    its unit slice zeroed (cheaper than recomputing the slice over the other sequences); then
    those reaching everything; then each span of sequences reaching only the units adds one
    narrow GEMM into the unit slice."""
    dtype = _gemm_dtype(go, x)
    go, x = _cast(go, dtype), _cast(x, dtype)
    batch, unit_dim = go.shape[1], 0 if on_rows else 1
    if not units.runs:
        unit = wide  # no unit slice: the weight is what ``wide`` sequences reach
    others_only, units_only = without(wide, unit), without(unit, wide)
    both = without(wide, others_only)
    if not others_only and _covers(both, batch):
        grad = go.reshape(-1, go.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    else:
        # Per sequence, [n, s] and [s, h] views: one dispatch each for the whole batch.
        go_seqs, x_seqs = go.permute(1, 2, 0).unbind(0), x.unbind(1)
        grad = _add_sequences(None, go_seqs, x_seqs, others_only)
        if grad is not None:
            units.zero(grad, unit_dim, UNITS)
        grad = _add_sequences(grad, go_seqs, x_seqs, both)
        if grad is None:
            grad = go.new_zeros(go.shape[-1], x.shape[-1])
    for start, stop in units_only:  # one narrow GEMM per span of such sequences
        go_s, x_s = go[:, start:stop], x[:, start:stop]
        piece = (units.columns(go_s).t().mm(x_s.reshape(-1, x.shape[-1])) if on_rows
                 else go_s.reshape(-1, go.shape[-1]).t().mm(units.columns(x_s)))
        units.write(grad, unit_dim, piece, accumulate=True)
    return grad


def _sum_rows(rows: torch.Tensor, spans: Spans) -> torch.Tensor:
    """The sum of ``rows[start:stop]`` over ``spans`` ([b, n] -> [n])."""
    total = None
    for start, stop in spans:
        part = rows[start:stop].sum(0)
        total = part if total is None else total.add_(part)
    return rows.new_zeros(rows.shape[-1]) if total is None else total


def seq_bias_grad(go: torch.Tensor, wide: Spans, unit: Spans, units: Units) -> torch.Tensor:
    """Bias gradient: every entry from ``wide`` sequences, the unit entries from ``unit``."""
    per_seq = go.sum(0, dtype=torch.float32)  # [b, n]: one pass over the activations
    grad = _sum_rows(per_seq, wide)
    if units.runs and unit != wide:
        grad = torch.where(units.mask(go.device), _sum_rows(per_seq, unit), grad)
    return _cast(grad, go.dtype)


def kept_spans(routing: TokenRouting) -> Spans:
    """Sequences whose gradients reach every parameter: all but the forget-labelled ones."""
    return routing.memo("kept_spans",
                        lambda: merged(routing.spans[UNLABELED] + routing.spans[RETAIN]))


def whole_batch(routing: TokenRouting) -> Spans:
    return ((0, routing.batch),)


def sequence_spans_active(routing: Optional[TokenRouting], x: torch.Tensor) -> bool:
    """Whether this call takes the per-sequence path: per-sequence labels, eager mode, and
    ``[s, b, h]`` activations with the routing's batch size."""
    return (not torch.compiler.is_compiling() and routing is not None
            and routing.spans is not None and routing.use_spans and x.dim() == 3
            and x.shape[1] == routing.batch)


class SeqMaskedColumnLinear(torch.autograd.Function):
    """Column layer (qkv, fc1, output layer) under SGTM: forget-labelled sequences update only
    the forget-unit rows (all other sequences: every row). Forward and input gradient are
    unmasked; the input gradient's TP all-reduce is megatron's, as in
    ``masking.MaskedWgradLinear``, so no collective is added or removed."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, x, weight, bias, wide: Spans, units: Units, mask_bias: bool,
                allreduce_dgrad, tp_group, sequence_parallel=False):
        ctx.save_for_backward(x, weight)
        ctx.wide, ctx.units, ctx.mask_bias = wide, units, mask_bias
        ctx.has_bias, ctx.allreduce_dgrad, ctx.tp_group = bias is not None, allreduce_dgrad, tp_group
        ctx.sequence_parallel = sequence_parallel
        out = torch.matmul(column_input(x, sequence_parallel, tp_group), weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        every = ((0, grad_out.shape[1]),)

        def weight_grads(total):
            grad_w = seq_weight_grad(grad_out, total, ctx.wide, every, ctx.units, on_rows=True)
            grad_b = None
            if ctx.has_bias:
                grad_b = (seq_bias_grad(grad_out, ctx.wide, every, ctx.units) if ctx.mask_bias
                          else grad_out.sum((0, 1)))
            return _cast(grad_w, weight.dtype), grad_b

        grads = column_backward(x, weight, grad_out, ctx.sequence_parallel, ctx.allreduce_dgrad,
                                ctx.tp_group, weight_grads)
        return grads + (None,) * 7


@dataclass(frozen=True)
class RowPlan:
    """Row layer (proj, fc2): per class of sequences, the weight columns its forward uses and
    its input gradient reaches; and which sequences update which weight columns."""

    # (block, spans): the input columns (UNITS or OTHERS) zeroed for those sequences in the
    # forward's gated input copy; empty when no sequence's forward is gated.
    forward_zero: tuple[tuple[str, Spans], ...]
    dgrad_zero: tuple[tuple[Spans, str], ...]  # (spans, part of the input gradient zeroed)
    wide: Spans  # sequences updating the non-unit weight columns
    unit: Spans  # sequences updating the forget-unit weight columns

    @property
    def gates_forward(self) -> bool:
        return bool(self.forward_zero)

    @staticmethod
    def of(routing: TokenRouting, rule, masked_wgrad: bool) -> "RowPlan":
        key = ("row_plan", rule, masked_wgrad)
        return routing.memo(key, lambda: RowPlan._build(routing.spans, rule, masked_wgrad))

    @staticmethod
    def _build(spans, rule, masked_wgrad: bool) -> "RowPlan":
        retain = OTHERS if rule.retain_path_zeroing else ALL
        if rule.forget_token_gate == "zero":  # activation masking: retain columns are zero
            forget = (UNITS, UNITS, UNITS)
        elif rule.forget_token_gate == "detach":  # Gradient Routing: no dgrad into retain columns
            forget = (ALL, UNITS, ALL)
        elif masked_wgrad:  # SGTM: only the forget columns learn from forget tokens
            forget = (ALL, ALL, UNITS)
        else:
            forget = (ALL, ALL, ALL)
        classes = ((spans[UNLABELED], ALL, ALL, ALL), (spans[RETAIN], retain, retain, retain),
                   (spans[FORGET],) + forget)
        zero_of = {OTHERS: UNITS, UNITS: OTHERS}
        # A sequence whose forward uses only one block has the other block zeroed.
        forward_zero = {block: merged(x for s, fwd, _, _ in classes if fwd == zero_of[block]
                                      for x in s) for block in (OTHERS, UNITS)}
        return RowPlan(
            forward_zero=tuple((b, z) for b, z in forward_zero.items() if z),
            dgrad_zero=tuple((s, zero_of[d]) for s, _, d, _ in classes if s and d != ALL),
            wide=merged(x for s, _, _, w in classes if w in (ALL, OTHERS) for x in s),
            unit=merged(x for s, _, _, w in classes if w in (ALL, UNITS) for x in s))


def _zero_blocks(x: torch.Tensor, blocks: tuple[tuple[str, Spans], ...], units: Units) -> None:
    """Zero, in place, each block of input columns of ``x`` ([s, b, h]) for its sequences."""
    for block, spans in blocks:
        for start, stop in spans:
            units.zero(x[:, start:stop], 2, block)


def _gemm_gated_in_place(x: torch.Tensor, weight: torch.Tensor,
                         blocks: tuple[tuple[str, Spans], ...], units: Units) -> torch.Tensor:
    """``x @ weight^T`` with ``blocks`` of input columns zeroed, computed in ``x``'s own memory:
    the gated entries (a few sequences' unit columns) are kept aside, zeroed, and written back
    bitwise once the GEMM has read them. This goes through ``x.data``, whose version counter
    is separate, because other autograd nodes may have saved ``x`` (SDPA saves the attention
    output that is proj's input): its values are what they saved again before any backward
    can read them, and a version bump would make autograd reject them. This holds because the
    zeroing, the GEMM and the write-back run in order on one stream; something reading ``x``
    on another stream meanwhile (activation offloading, which this project does not enable)
    would need this replaced by the gated copy."""
    raw = x.data
    restores = [units.zero_restorably(raw[:, start:stop], 2, block)
                for block, spans in blocks for start, stop in spans]
    try:
        return torch.matmul(raw, _cast(weight, raw.dtype).t())
    finally:
        for restore in reversed(restores):
            restore()


class SeqRoutedRowLinear(torch.autograd.Function):
    """Row layer GEMM with its input gate and masked weight gradient.

    ``x`` is the ungated input, and what backward keeps (so activation memory is as without
    masking). When some sequence's forward is gated, one batch-wide GEMM reads the input with
    the gated columns zeroed in place and restored afterwards (``_gemm_gated_in_place``):
    faster on CPU than a gated copy of the whole input (a fresh activation-sized buffer),
    per-sequence forward GEMMs (~30% slower for the same FLOPs) or a contraction split into
    unit and other columns. Zeroing a sequence's input columns is exactly multiplying it by
    the weight with those columns zeroed."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, x, weight, plan: RowPlan, units: Units):
        ctx.plan, ctx.units = plan, units
        ctx.save_for_backward(x, weight)
        if not plan.gates_forward:
            return torch.matmul(x, _cast(weight, x.dtype).t())
        dtype = _gemm_dtype(x, weight)
        if x.dtype == dtype and x.is_contiguous():
            return _gemm_gated_in_place(x, weight, plan.forward_zero, units)
        gated = x.to(dtype, copy=True)  # autocast (or a strided input): the cast is the copy
        _zero_blocks(gated, plan.forward_zero, units)
        return torch.matmul(gated, _cast(weight, dtype).t())

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        plan, units = ctx.plan, ctx.units
        grad_in = grad_out.matmul(weight)  # this function's own tensor: zeroed in place
        for spans, part in plan.dgrad_zero:
            for start, stop in spans:
                units.zero(grad_in[:, start:stop], 2, part)
        grad_w = seq_weight_grad(grad_out, x, plan.wide, plan.unit, units, on_rows=False)
        return grad_in, _cast(grad_w, weight.dtype), None, None


class SeqMaskedBiasBroadcast(torch.autograd.Function):
    """A bias broadcast to ``[s, b, n]`` that learns every entry from ``wide`` sequences and
    the unit entries from ``unit`` ones (see ``masking.MaskedBiasBroadcast``)."""

    @staticmethod
    def forward(ctx, bias, shape, wide: Spans, unit: Spans, units: Units):
        ctx.wide, ctx.unit, ctx.units = wide, unit, units
        return bias.expand(*shape)

    @staticmethod
    def backward(ctx, grad):
        return seq_bias_grad(grad, ctx.wide, ctx.unit, ctx.units), None, None, None, None


class SeqMaskedAffine(torch.autograd.Function):
    """``x_hat * w (+ b)`` for norms whose affine parameters learn only from ``kept``
    sequences; the input gradient is unchanged."""

    @staticmethod
    def forward(ctx, x_hat, weight, bias, kept: Spans):
        ctx.save_for_backward(x_hat, weight)
        ctx.kept, ctx.has_bias = kept, bias is not None
        out = x_hat * weight
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad):
        x_hat, weight = ctx.saved_tensors
        grad_w = weight.new_zeros(weight.shape, dtype=torch.float32)
        grad_b = weight.new_zeros(weight.shape, dtype=torch.float32) if ctx.has_bias else None
        for start, stop in ctx.kept:
            go = grad[:, start:stop]
            grad_w += (go * x_hat[:, start:stop]).sum((0, 1), dtype=torch.float32)
            if grad_b is not None:
                grad_b += go.sum((0, 1), dtype=torch.float32)
        return (grad * weight, _cast(grad_w, weight.dtype),
                None if grad_b is None else _cast(grad_b, weight.dtype), None)


class SeqDropGrads(torch.autograd.Function):
    """Identity whose gradient is zero on ``dropped`` sequences (embedding output)."""

    @staticmethod
    def forward(ctx, x, dropped: Spans):
        ctx.dropped = dropped
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        for start, stop in ctx.dropped:
            grad[:, start:stop] = 0.0
        return grad, None
