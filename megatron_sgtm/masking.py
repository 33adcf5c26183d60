"""Per-token gradient masks as autograd functions (plain torch, no megatron).

The weight-gradient mask is *lean*: rather than multiplying grad_output by a full-size mask, it
runs the weight-gradient GEMM on the kept tokens only and adds the forget-unit slice of the
dropped tokens with a second, narrow GEMM. That does no more FLOPs than the unmasked GEMM.

Input gradients (dgrad) are never masked: SGTM only restricts which *parameters* learn from a
token, never what earlier layers see.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .routing import FORGET, RETAIN, TokenRouting

# As megatron's own linear function: backward runs under the forward's CUDA autocast state, so
# the wgrad/dgrad GEMMs use bf16 like the forward.
_custom_fwd = torch.amp.custom_fwd(device_type="cuda")
_custom_bwd = torch.amp.custom_bwd(device_type="cuda")


_MAX_SLICE_RUNS = 16


def _add_to_units(grad: torch.Tensor, dim: int, units: torch.Tensor, runs, piece: torch.Tensor):
    """``grad[units along dim] += piece``. Forget units come in a few contiguous runs
    (block-strided placement), and slice adds beat ``index_add_`` along a strided dim."""
    if len(runs) > _MAX_SLICE_RUNS:
        grad.index_add_(dim, units, piece)
        return
    offset = 0
    for start, stop in runs:
        grad.narrow(dim, start, stop - start).add_(piece.narrow(dim, offset, stop - start))
        offset += stop - start


def _masked_weight_grad(go: torch.Tensor, x: torch.Tensor, kept: torch.Tensor,
                        dropped: torch.Tensor, units: torch.Tensor, runs,
                        on_rows: bool) -> torch.Tensor:
    """``go.T @ x`` where ``dropped`` tokens contribute only to ``units`` (rows or columns)."""
    go_kept = go.index_select(0, kept)
    grad = go_kept.t().matmul(x.index_select(0, kept))
    if units.numel() and dropped.numel():
        go_dropped = go.index_select(0, dropped)
        x_dropped = x.index_select(0, dropped)
        if on_rows:
            _add_to_units(grad, 0, units, runs, go_dropped.index_select(1, units).t().matmul(x_dropped))
        else:
            _add_to_units(grad, 1, units, runs, go_dropped.t().matmul(x_dropped.index_select(1, units)))
    return grad


def _masked_bias_grad(go: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor,
                      units: torch.Tensor) -> torch.Tensor:
    grad = go.index_select(0, kept).sum(0)
    if units.numel() and dropped.numel():
        grad.index_add_(0, units, go.index_select(0, dropped).index_select(1, units).sum(0))
    return grad


def gather_sequence(x: torch.Tensor, group, async_op: bool = False):
    """All-gather ``[s/tp, b, h]`` sequence shards into ``[s, b, h]`` (sequence parallelism)."""
    out = x.new_empty((x.shape[0] * dist.get_world_size(group),) + tuple(x.shape[1:]))
    handle = dist.all_gather_into_tensor(out, x.contiguous(), group=group, async_op=async_op)
    return out, handle


def column_input(x: torch.Tensor, sequence_parallel: bool, group) -> torch.Tensor:
    """The input a column layer's GEMM sees: the whole sequence under sequence parallelism."""
    return gather_sequence(x, group)[0] if sequence_parallel else x


def column_backward(x, weight, grad_out, sequence_parallel: bool, allreduce_dgrad: bool,
                    group, weight_grads):
    """A column layer's backward with megatron's communication, call for call
    (``LinearWithGradAccumulationAndAsyncCommunication``): under sequence parallelism re-gather
    the saved input shard while the input gradient is computed, then reduce-scatter that
    gradient while ``weight_grads(total_input)`` runs; otherwise all-reduce the input gradient
    (when megatron would) while the weight gradients run. Returns (grad_in, *weight_grads)."""
    gathering = None
    total = x
    if sequence_parallel:
        total, gathering = gather_sequence(x, group, async_op=True)
    grad_in = grad_out.matmul(weight)
    if gathering is not None:
        gathering.wait()
    handle = None
    if sequence_parallel:
        full = grad_in.contiguous()
        grad_in = full.new_empty(x.shape)
        handle = dist.reduce_scatter_tensor(grad_in, full, group=group, async_op=True)
    elif allreduce_dgrad:
        handle = dist.all_reduce(grad_in, group=group, async_op=True)
    grads = weight_grads(total)
    if handle is not None:
        handle.wait()
    return (grad_in,) + tuple(grads)


class MaskedWgradLinear(torch.autograd.Function):
    """``y = x W^T + b`` whose W/b gradients ignore ``dropped`` tokens outside ``units``.

    ``on_rows``: units index output features (column-parallel layers) or input features
    (row-parallel layers). Communication (the input gradient's TP all-reduce, or the
    sequence-parallel gather and reduce-scatter) is megatron's, so no collective is added or
    removed. Token indices refer to the whole sequence the GEMM sees.
    """

    @staticmethod
    @_custom_fwd
    def forward(ctx, x, weight, bias, kept, dropped, units, runs, on_rows, mask_bias,
                allreduce_dgrad, tp_group, sequence_parallel=False):
        ctx.save_for_backward(x, weight, kept, dropped, units)
        ctx.runs = runs
        ctx.on_rows, ctx.mask_bias, ctx.has_bias = on_rows, mask_bias, bias is not None
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        ctx.sequence_parallel = sequence_parallel
        out = torch.matmul(column_input(x, sequence_parallel, tp_group), weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_out):
        x, weight, kept, dropped, units = ctx.saved_tensors
        go = grad_out.reshape(-1, grad_out.shape[-1])

        def weight_grads(total):
            flat_x = total.reshape(-1, total.shape[-1])
            grad_w = _masked_weight_grad(go, flat_x, kept, dropped, units, ctx.runs, ctx.on_rows)
            grad_b = None
            if ctx.has_bias:
                grad_b = (_masked_bias_grad(go, kept, dropped, units) if ctx.mask_bias
                          else go.sum(0))
            return grad_w.to(weight.dtype), grad_b

        grads = column_backward(x, weight, grad_out, ctx.sequence_parallel, ctx.allreduce_dgrad,
                                ctx.tp_group, weight_grads)
        return grads + (None,) * 10


class MaskedBiasBroadcast(torch.autograd.Function):
    """A bias broadcast to ``[s, b, n]`` whose gradient skips dropped tokens outside ``units``.

    Megatron adds the bias of most linears outside the GEMM (``skip_bias_add``), fused with the
    activation or the residual add; broadcasting here keeps that fusion and masks per token.
    """

    @staticmethod
    def forward(ctx, bias, shape, kept, dropped, units):
        ctx.save_for_backward(kept, dropped, units)
        return bias.expand(*shape)

    @staticmethod
    def backward(ctx, grad):
        kept, dropped, units = ctx.saved_tensors
        go = grad.reshape(-1, grad.shape[-1])
        return _masked_bias_grad(go, kept, dropped, units), None, None, None, None


class MaskedAffine(torch.autograd.Function):
    """``x_hat * w (+ b)`` for norms: w/b learn only from ``kept`` tokens; dgrad unchanged."""

    @staticmethod
    def forward(ctx, x_hat, weight, bias, kept):
        ctx.save_for_backward(x_hat, weight, kept)
        ctx.has_bias = bias is not None
        out = x_hat * weight
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad):
        x_hat, weight, kept = ctx.saved_tensors
        go = grad.reshape(-1, grad.shape[-1]).index_select(0, kept)
        xh = x_hat.reshape(-1, x_hat.shape[-1]).index_select(0, kept)
        grad_w = (go * xh).sum(0)
        grad_b = go.sum(0) if ctx.has_bias else None
        return grad * weight, grad_w, grad_b, None


class DropTokenGrads(torch.autograd.Function):
    """Identity whose gradient is zero at ``dropped`` tokens (embedding output under masking)."""

    @staticmethod
    def forward(ctx, x, dropped):
        ctx.save_for_backward(dropped)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (dropped,) = ctx.saved_tensors
        grad = grad.clone()
        grad.view(-1, grad.shape[-1]).index_fill_(0, dropped, 0.0)
        return grad, None


def gate_row_input(x: torch.Tensor, routing: TokenRouting, forget_cols: tuple[int, ...],
                   retain_path: bool, forget_gate: str | None) -> torch.Tensor:
    """Per-token, per-column gate on the input of a row-parallel linear (proj / fc2).

    - retain-labelled tokens: forget columns are zeroed (the masked retain path);
    - forget-labelled tokens under Gradient Routing: retain columns are detached;
    - forget-labelled tokens under activation masking: retain columns are zeroed.

    The boolean masks are built once per micro-batch and column set (shared by every layer with
    the same units), so each layer pays one ``masked_fill`` / ``where`` forward and backward.
    """
    n = x.shape[-1]
    zero = None
    if retain_path and routing.has_retain:
        zero = routing.column_mask(RETAIN, forget_cols, n, x.device, invert_columns=False)
    if forget_gate is None or not routing.has_forget:
        return x if zero is None else x.masked_fill(zero, 0.0)
    on_retain_cols = routing.column_mask(FORGET, forget_cols, n, x.device, invert_columns=True)
    if forget_gate == "zero":
        both = on_retain_cols if zero is None else (on_retain_cols | zero)
        return x.masked_fill(both, 0.0)
    kept = x if zero is None else x.masked_fill(zero, 0.0)
    return torch.where(on_retain_cols, x.detach(), kept)
