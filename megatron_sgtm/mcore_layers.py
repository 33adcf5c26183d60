"""The megatron-core modules SGTM swaps in. All use of megatron internals lives here.

- ``SGTMColumnParallelLinear`` / ``SGTMRowParallelLinear`` hook megatron's ``_forward_impl``
  (the single place both route their GEMM through) and, for biases megatron adds outside the
  GEMM (``skip_bias_add``), wrap the returned bias in a per-token masked broadcast.
- ``SDPACoreAttention`` replaces megatron's local DotProductAttention with torch's fused
  ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
- ``RoutedNorm`` is LayerNorm/RMSNorm whose affine parameters can skip forget tokens.
- ``install_routed_recompute`` makes megatron's activation checkpointing re-run a forward
  under the routing that was current when the checkpoint was taken.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule

from . import dropout as dropout_mod
from . import routing as routing_mod
from .masking import DropTokenGrads, MaskedAffine, MaskedBiasBroadcast, MaskedWgradLinear, gate_row_input
from .partition import to_runs
from .routing import FORGET, LinearRule
from .seq_masking import (RowPlan, SeqDropGrads, SeqMaskedAffine, SeqMaskedBiasBroadcast,
                          SeqMaskedColumnLinear, SeqRoutedRowLinear, Units, kept_spans,
                          sequence_spans_active, whole_batch)


class _RoutedLinearMixin:
    """State bound after model construction by ``bind_routing``.

    ``_sgtm_units``: local forget rows (column layers) or columns (row layers);
    ``_sgtm_rule``: what this linear does under the configured method.
    """

    _sgtm_rule: LinearRule = LinearRule()
    _sgtm_units: tuple[int, ...] = ()
    _sgtm_runs: tuple[tuple[int, int], ...] = ()
    _sgtm_mask_bias: bool = True

    def bind(self, rule: LinearRule, units: tuple[int, ...], mask_bias: bool = True) -> None:
        self._sgtm_rule = rule
        self._sgtm_units = tuple(units)
        self._sgtm_runs = to_runs(self._sgtm_units)
        width = (self.output_size_per_partition if isinstance(self, ColumnParallelLinear)
                 else self.input_size_per_partition)
        self._sgtm_unit_set = Units(self._sgtm_runs, width)
        self._sgtm_mask_bias = mask_bias
        self._sgtm_unit_cache: dict = {}

    def _units_on(self, device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_sgtm_unit_cache", {})
        key = str(device)
        if key not in cache:
            cache[key] = torch.tensor(self._sgtm_units, dtype=torch.long, device=device)
        return cache[key]

    def _masks_wgrad_now(self):
        """The routing to apply to this call's weight gradient, or None."""
        routing = routing_mod.current()
        if routing is None or not self._sgtm_rule.masked_wgrad or not routing.has_forget:
            return None
        return routing

    def _routed_gemm(self, megatron_impl, input, weight, args, kwargs, on_rows: bool):
        """Megatron's own GEMM unless this call's weight gradient must be masked."""
        if kwargs.get("tp_group") is None:
            # Megatron's row layer passes tp_group=None, and resolving None on every call
            # emits a deprecation warning, which torch.compile cannot trace: each layer's
            # graph would break there. The layer's own group is the same group.
            kwargs = {**kwargs, "tp_group": self.tp_group}
        if kwargs.get("allreduce_dgrad") and torch.compiler.is_compiling():
            # The column layers all-reduce the input gradient asynchronously inside their
            # backward, which torch.compile cannot trace (the layer would run eagerly). The
            # same sum as a separate, synchronous autograd op traces.
            input = copy_to_tensor_model_parallel_region(input, group=kwargs["tp_group"])
            kwargs = {**kwargs, "allreduce_dgrad": False}
        routing = self._masks_wgrad_now()
        if routing is None or not weight.requires_grad:
            return megatron_impl(input, weight, *args, **kwargs)
        self._check_supported(kwargs)
        return self._masked_forward(routing, input, weight, kwargs.get("bias"),
                                    kwargs.get("allreduce_dgrad", False), kwargs.get("tp_group"),
                                    bool(kwargs.get("sequence_parallel")), on_rows)

    def _masked_forward(self, routing, input, weight, bias, allreduce_dgrad, tp_group,
                        sequence_parallel, on_rows):
        """Under sequence parallelism a column layer's input is this rank's sequence slice;
        the GEMM (and so the masks) covers the gathered whole sequence."""
        device = input.device
        if on_rows and sequence_spans_active(routing, input):
            return SeqMaskedColumnLinear.apply(
                input, weight, bias, kept_spans(routing), self._sgtm_unit_set,
                self._sgtm_mask_bias, allreduce_dgrad, tp_group, sequence_parallel)
        return MaskedWgradLinear.apply(
            input, weight, bias, routing.kept_index(device), routing.forget_index(device),
            self._units_on(device), self._sgtm_runs, on_rows, self._sgtm_mask_bias,
            allreduce_dgrad, tp_group, sequence_parallel)

    def _wrap_bias(self, output, bias):
        routing = self._masks_wgrad_now()
        if bias is None or routing is None or not self._sgtm_mask_bias:
            return bias
        device = output.device
        is_column = isinstance(self, ColumnParallelLinear)
        routing = routing.for_length(output.shape[0])  # a row layer's output may be a slice
        if sequence_spans_active(routing, output):
            # Column biases: every sequence updates the forget-unit entries; row (output)
            # biases are retain parameters, updated by all but forget-labelled sequences.
            return SeqMaskedBiasBroadcast.apply(
                bias, tuple(output.shape), kept_spans(routing), whole_batch(routing),
                self._sgtm_unit_set if is_column else Units((), output.shape[-1]))
        return MaskedBiasBroadcast.apply(
            bias, tuple(output.shape), routing.kept_index(device), routing.forget_index(device),
            self._units_on(device) if is_column
            else torch.empty(0, dtype=torch.long, device=device))

    @staticmethod
    def _check_supported(kwargs):
        if kwargs.get("gradient_accumulation_fusion"):
            raise NotImplementedError(
                "SGTM routing needs gradient_accumulation_fusion off (it masks the wgrad GEMM)")


class SGTMColumnParallelLinear(_RoutedLinearMixin, ColumnParallelLinear):
    """qkv / fc1 (and the output layer under mask-embeddings): masks retain-row wgrad."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return self._routed_gemm(super()._forward_impl, input, weight, args, kwargs, on_rows=True)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight=weight,
                                       runtime_gather_output=runtime_gather_output)
        return output, self._wrap_bias(output, bias)


class SGTMRowParallelLinear(_RoutedLinearMixin, RowParallelLinear):
    """proj / fc2: gates the input per token, masks retain-column wgrad and the output bias."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        rule = self._sgtm_rule
        routing = routing_mod.current()
        if sequence_spans_active(routing, input):
            masked_wgrad = self._masks_wgrad_now() is not None and weight.requires_grad
            gated = (rule.retain_path_zeroing and routing.has_retain) or (
                rule.forget_token_gate is not None and routing.has_forget)
            if gated or masked_wgrad:
                self._check_supported(kwargs)
                return SeqRoutedRowLinear.apply(input, weight,
                                                RowPlan.of(routing, rule, masked_wgrad),
                                                self._sgtm_unit_set)
            return super()._forward_impl(input, weight, *args, **kwargs)
        if routing is not None and (rule.retain_path_zeroing or rule.forget_token_gate):
            input = gate_row_input(input, routing, self._sgtm_units,
                                   rule.retain_path_zeroing, rule.forget_token_gate)
        return self._routed_gemm(super()._forward_impl, input, weight, args, kwargs,
                                 on_rows=False)

    def forward(self, input_):
        output, bias = super().forward(input_)
        if bias is None and self.bias is not None and not self.skip_bias_add:
            raise NotImplementedError("SGTM row layers expect skip_bias_add=True")
        return output, self._wrap_bias(output, bias)


class RoutedNorm(torch.nn.Module):
    """LayerNorm / RMSNorm for transformer blocks; under mask-embeddings its affine parameters
    learn only from non-forget tokens (the normalisation's input gradient is unchanged)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(
            torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        self.masked = False

    def _normalise(self, x, weight, bias):
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), weight, bias, self.eps)

    def forward(self, x):
        routing = routing_mod.current()
        if routing is not None:
            routing = routing.for_length(x.shape[0])  # a sequence-parallel slice
        if not self.masked or routing is None or not routing.has_forget:
            return self._normalise(x, self.weight, self.bias)
        x_hat = self._normalise(x, None, None)
        if sequence_spans_active(routing, x):
            return SeqMaskedAffine.apply(x_hat, self.weight, self.bias, kept_spans(routing))
        return MaskedAffine.apply(x_hat, self.weight, self.bias, routing.kept_index(x.device))


def drop_forget_grads_hook(_module, _inputs, output):
    """Forward hook for the embedding: forget tokens give the embedding tables no gradient."""
    routing = routing_mod.current()
    if routing is not None:
        routing = routing.for_length(output.shape[0])  # scattered under sequence parallelism
    if routing is None or not routing.has_forget or not torch.is_grad_enabled():
        return output
    if sequence_spans_active(routing, output):
        return SeqDropGrads.apply(output, routing.spans[FORGET])
    return DropTokenGrads.apply(output, routing.forget_index(output.device))


class SDPACoreAttention(MegatronModule):
    """Causal self-attention with ``torch.nn.functional.scaled_dot_product_attention``.

    Takes megatron's layout (q ``[s, b, np, hn]``, k/v ``[s, b, ng, hn]``) and returns
    ``[s, b, np * hn]``, like DotProductAttention.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, **_unused):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or config.softmax_scale or (
            1.0 / math.sqrt(config.kv_channels))

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention supports plain causal attention only")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


_MEGATRON_CHECKPOINT = None


def install_routed_recompute() -> None:
    """Wrap ``megatron.core.tensor_parallel.checkpoint``, which megatron's transformer block
    (full recompute) and attention (selective recompute) look up at call time, so that the
    recomputed forward runs under the routing (and dropout keys) of the micro-batch that took
    the checkpoint. Without it the recompute, which runs inside backward, would see no routing
    or a later micro-batch's. Idempotent; unchanged behaviour when nothing is routed."""
    global _MEGATRON_CHECKPOINT
    from megatron.core import tensor_parallel

    if _MEGATRON_CHECKPOINT is not None:
        return
    _MEGATRON_CHECKPOINT = tensor_parallel.checkpoint

    def routed_checkpoint(function, distribute_saved_activations, *args):
        captured, keys = routing_mod.current(), dropout_mod.current()

        def rerun(*inputs):
            with routing_mod.reenter(captured), dropout_mod.reenter(keys):
                return function(*inputs)

        return _MEGATRON_CHECKPOINT(rerun, distribute_saved_activations, *args)

    tensor_parallel.checkpoint = routed_checkpoint
