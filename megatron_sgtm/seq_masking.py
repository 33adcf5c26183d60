"""Copy-free masking for micro-batches whose sequences each carry one label.

Label-homogeneous packing (the default) gives every sequence one label, so the tokens a rule
treats alike are whole sequences: columns ``x[:, b]`` of megatron's ``[s, b, h]``
activations. Such a column is a strided 2-D matrix that BLAS reads in place. So the masked
GEMMs here run per sequence on views of the activations (``mm(..., out=y[:, b])`` writes in
place too), and every mask is weight-sized or unit-sized, never activation-sized:

- a weight gradient is one GEMM per sequence allowed to update the whole weight (one GEMM in
  all when that is the whole batch), then its forget-unit rows/columns are overwritten by one
  narrow GEMM over the unit columns of every token, with the sequences that may not update
  them zeroed in that narrow copy. Never more FLOPs than the unmasked GEMM, plus the narrow one;
- a row layer's input gate (retain path, Gradient Routing's detach, activation masking) is a
  per-sequence choice of weight: ``W``, ``W`` with its forget columns zeroed, or ``W`` with
  only them kept. Zeroing input columns of a token is the same as zeroing those weight
  columns for it, in the forward and in the weight gradient; the input gradient is one GEMM
  whose gated columns are zeroed in place per sequence range;
- bias and norm-affine gradients are one reduction over the sequence dimension, then sums of
  a few ``[b, n]`` rows.

``masking.py`` holds the per-token path (index sets, boolean masks). It serves micro-batches
that mix labels inside a sequence, and compiled graphs (whose shapes stay dynamic there,
while per-sequence loops would specialise the graph on every label layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

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


class Units:
    """One linear's local forget units (rows of a column layer, input columns of a row layer)
    out of ``width``: their runs, and index tensors cached per device."""

    def __init__(self, runs: Runs, width: int) -> None:
        self.runs, self.width = tuple(runs), width
        self.others = complement(self.runs, width)
        self._index: dict = {}

    def index(self, device, part: str = UNITS) -> torch.Tensor:
        key = (part, str(device))
        if key not in self._index:
            runs = self.runs if part == UNITS else self.others
            ids = [i for start, stop in runs for i in range(start, stop)]
            self._index[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._index[key]

    def zero(self, tensor: torch.Tensor, dim: int, part: str) -> torch.Tensor:
        """Zero ``part`` (UNITS or OTHERS) along ``dim`` in place."""
        runs = self.runs if part == UNITS else self.others
        if len(runs) == 1:
            start, stop = runs[0]
            tensor.narrow(dim, start, stop - start).zero_()
        elif runs:
            tensor.index_fill_(dim, self.index(tensor.device, part), 0.0)
        return tensor

    def columns(self, t2d: torch.Tensor) -> torch.Tensor:
        """``t2d[:, units]``: a view for one run, else a narrow copy."""
        if len(self.runs) == 1:
            start, stop = self.runs[0]
            return t2d[:, start:stop]
        return t2d.index_select(1, self.index(t2d.device))

    def write(self, grad: torch.Tensor, dim: int, piece: torch.Tensor) -> None:
        """``grad[units along dim] = piece``."""
        if len(self.runs) == 1:
            start, stop = self.runs[0]
            grad.narrow(dim, start, stop - start).copy_(piece)
        else:
            grad.index_copy_(dim, self.index(grad.device), piece)


def _weight_part(weight: torch.Tensor, part: str, units: Units) -> torch.Tensor:
    """``weight`` using only ``part`` of its input columns (the rest zeroed, weight-sized)."""
    if part == ALL:
        return weight
    return units.zero(weight.clone(), 1, OTHERS if part == UNITS else UNITS)


def _gemm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensors[0].dtype


def _covers(spans: Spans, batch: int) -> bool:
    return spans == ((0, batch),)


def seq_weight_grad(go: torch.Tensor, x: torch.Tensor, wide: Spans, unit: Spans,
                    units: Units, on_rows: bool) -> torch.Tensor:
    """``go^T x`` summed over the tokens allowed to reach each part of the weight: ``wide``
    sequences reach all of it, ``unit`` sequences the forget-unit rows (``on_rows``, column
    layers) or columns (row layers)."""
    dtype = _gemm_dtype(go, x)
    go, x = go.to(dtype), x.to(dtype)
    batch = go.shape[1]
    go2d, x2d = go.reshape(-1, go.shape[-1]), x.reshape(-1, x.shape[-1])
    if _covers(wide, batch):
        grad = go2d.t().mm(x2d)
    else:
        grad = go.new_zeros(go.shape[-1], x.shape[-1])
        for b in sequences(wide):
            grad.addmm_(go.select(1, b).t(), x.select(1, b))
    if not units.runs or unit == wide:
        return grad
    narrow = units.columns(go2d if on_rows else x2d)
    excluded = complement(unit, batch)
    if excluded:
        if narrow._base is not None:  # a view of the activations: never write into it
            narrow = narrow.clone(memory_format=torch.contiguous_format)
        per_seq = narrow.view(go.shape[0], batch, -1)
        for start, stop in excluded:
            per_seq[:, start:stop] = 0.0
    if on_rows:
        units.write(grad, 0, narrow.t().mm(x2d))
    else:
        units.write(grad, 1, go2d.t().mm(narrow))
    return grad


def seq_bias_grad(go: torch.Tensor, wide: Spans, unit: Spans, units: Units) -> torch.Tensor:
    """Bias gradient: every entry from ``wide`` sequences, the unit entries from ``unit``."""
    per_seq = go.sum(0, dtype=torch.float32)  # [b, n]: one pass over the activations
    grad = per_seq.new_zeros(go.shape[-1])
    for start, stop in wide:
        grad += per_seq[start:stop].sum(0)
    if units.runs and unit != wide:
        from_units = per_seq.new_zeros(go.shape[-1])
        for start, stop in unit:
            from_units += per_seq[start:stop].sum(0)
        units.write(grad, 0, units.columns(from_units.unsqueeze(0)).squeeze(0))
    return grad.to(go.dtype)


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
            return grad_w.to(weight.dtype), grad_b

        grads = column_backward(x, weight, grad_out, ctx.sequence_parallel, ctx.allreduce_dgrad,
                                ctx.tp_group, weight_grads)
        return grads + (None,) * 7


@dataclass(frozen=True)
class RowPlan:
    """Row layer (proj, fc2): per class of sequences, the weight columns its forward uses and
    its input gradient reaches; and which sequences update which weight columns."""

    forward_parts: tuple[tuple[Spans, str], ...]  # (spans, part) with part != ALL somewhere
    dgrad_zero: tuple[tuple[Spans, str], ...]  # (spans, part of the input gradient zeroed)
    wide: Spans  # sequences updating the non-unit weight columns
    unit: Spans  # sequences updating the forget-unit weight columns

    @property
    def gates_forward(self) -> bool:
        return any(part != ALL for _spans, part in self.forward_parts)

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
        return RowPlan(
            forward_parts=tuple((s, fwd) for s, fwd, _, _ in classes if s),
            dgrad_zero=tuple((s, zero_of[d]) for s, _, d, _ in classes if s and d != ALL),
            wide=merged(x for s, _, _, w in classes if w in (ALL, OTHERS) for x in s),
            unit=merged(x for s, _, _, w in classes if w in (ALL, UNITS) for x in s))


class SeqRoutedRowLinear(torch.autograd.Function):
    """Row layer GEMM with its input gate and masked weight gradient, per sequence.

    ``x`` is the ungated input. A sequence whose forward part is not ``all`` is multiplied by
    the weight with the gated columns zeroed (exactly the gated input's product), each
    sequence into a view of one output."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, x, weight, plan: RowPlan, units: Units):
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.units = plan, units
        if not plan.gates_forward:
            return torch.matmul(x, weight.t())
        dtype = _gemm_dtype(x, weight)
        x = x.to(dtype)
        out = x.new_empty(x.shape[0], x.shape[1], weight.shape[0])
        for spans, part in plan.forward_parts:
            w = _weight_part(weight, part, units).to(dtype).t()
            for b in sequences(spans):
                torch.mm(x.select(1, b), w, out=out.select(1, b))
        return out

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
        return grad_in, grad_w.to(weight.dtype), None, None


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
        return (grad * weight, grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(weight.dtype), None)


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
