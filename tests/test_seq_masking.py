"""The per-sequence masking path (seq_masking.py) against plain set arithmetic and dense,
per-sequence masked references: span algebra, unit layouts (one run, block-strided grids,
irregular runs, none), the row-layer plans of every method, and both masked linears on every
label mix of a small batch."""
from __future__ import annotations

import itertools

import pytest
import torch

from megatron_sgtm.partition import block_strided_ids, to_runs
from megatron_sgtm.routing import FORGET, RETAIN, UNLABELED, TokenRouting, linear_rule
from megatron_sgtm.seq_masking import (OTHERS, UNITS, RowPlan, SeqMaskedColumnLinear,
                                       SeqRoutedRowLinear, Units, complement, grid, merged,
                                       seq_weight_grad, without)

BATCH = 4


def spans_of(members: set[int]) -> tuple:
    return merged((b, b + 1) for b in sorted(members))


def members(spans) -> set[int]:
    return {b for start, stop in spans for b in range(start, stop)}


def test_span_algebra_matches_set_arithmetic():
    subsets = [set(c) for r in range(7) for c in itertools.combinations(range(6), r)]
    for a in subsets:
        assert members(complement(spans_of(a), 6)) == set(range(6)) - a
        assert spans_of(a) == merged(reversed([(b, b + 1) for b in sorted(a)]))
        for b in subsets:
            assert members(without(spans_of(a), spans_of(b))) == a - b
            assert without(spans_of(a), spans_of(b)) == spans_of(a - b)  # canonical form


def test_grid_recognises_block_strided_placement_only():
    assert grid(((5, 8),), 8) == (1, 8, 5, 8)
    ids = block_strided_ids(1024, 128, 8)
    assert grid(to_runs(ids), 1024) == (8, 128, 112, 128)
    assert grid(to_runs(block_strided_ids(12, 6, 4)), 12) is None  # 1 or 2 per block
    assert grid(to_runs(block_strided_ids(12, 2, 4)), 12) == (2, 6, 5, 6)
    assert grid(((1, 2), (4, 6)), 8) is None  # unequal runs
    assert grid(((0, 2), (3, 5)), 8) is None  # unequal spacing
    assert grid(((2, 3), (5, 6), (7, 8)), 9) is None  # not at the same offset
    assert grid((), 8) is None


LAYOUTS = {
    "one_run": ((12, 16),),
    "grid": tuple(to_runs(block_strided_ids(16, 8, 4))),  # 4 blocks of 4, last 2 each
    "irregular": ((1, 2), (5, 8), (15, 16)),
    "none": (),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unit_views_equal_index_arithmetic(layout):
    runs, width = LAYOUTS[layout], 16
    units = Units(runs, width)
    ids = sorted(members(runs))
    others = sorted(set(range(width)) - set(ids))
    gen = torch.Generator().manual_seed(0)
    for dim, shape in ((0, (16, 3)), (1, (5, 16)), (2, (3, 4, 16))):
        base = torch.randn(shape, generator=gen)
        for part, cols in ((UNITS, ids), (OTHERS, others)):
            got = units.zero(base.clone(), dim, part)
            want = base.clone()
            if cols:
                want.index_fill_(dim, torch.tensor(cols, dtype=torch.long), 0.0)
            assert torch.equal(got, want), (layout, dim, part)
    t2d = torch.randn(5, width, generator=gen)
    if ids:
        assert torch.equal(units.columns(t2d), t2d[:, ids])
    for dim in (0, 1):
        grad = torch.randn(width, width, generator=gen)
        piece_shape = (len(ids), width) if dim == 0 else (width, len(ids))
        piece = torch.randn(piece_shape, generator=gen)
        for accumulate in (False, True):
            got = grad.clone()
            units.write(got, dim, piece, accumulate=accumulate)
            want = grad.clone()
            index = torch.tensor(ids, dtype=torch.long)
            if accumulate:
                want.index_add_(dim, index, piece)
            else:
                want.index_copy_(dim, index, piece)
            assert torch.equal(got, want), (layout, dim, accumulate)


# SGTM.md's row-layer table: per label, the input columns its forward uses, its input gradient
# reaches and its weight gradient updates ("all", "units" or "others").
ROW_TABLE = {
    ("sgtm", FORGET): ("all", "all", "units"),
    ("gradient_routing", FORGET): ("all", "units", "all"),
    ("activation_masking", FORGET): ("units", "units", "units"),
}
METHODS = ("sgtm", "gradient_routing", "activation_masking", "none")


def row_parts(method: str, label: int) -> tuple[str, str, str]:
    if method == "none" or label == UNLABELED:
        return ("all", "all", "all")
    if label == RETAIN:
        return ("others", "others", "others")
    return ROW_TABLE[(method, label)]


def column_mask(parts: str, units: set[int], width: int) -> torch.Tensor:
    keep = {"all": set(range(width)), "units": units,
            "others": set(range(width)) - units}[parts]
    return torch.tensor([float(c in keep) for c in range(width)])


def label_mixes():
    return [list(mix) for mix in itertools.product((UNLABELED, RETAIN, FORGET), repeat=BATCH)]


def routing_of(mix, seq=3) -> TokenRouting:
    return TokenRouting(torch.tensor(mix).unsqueeze(1).expand(len(mix), seq))


@pytest.mark.parametrize("method", METHODS)
def test_row_plan_zeroes_exactly_what_each_sequence_may_not_use(method):
    for mix in label_mixes():
        routing = routing_of(mix)
        plan = RowPlan.of(routing, linear_rule(method, "default", "fc2"), method == "sgtm")
        zero_fwd = {block: members(s) for block, s in plan.forward_zero}
        for block in (UNITS, OTHERS):
            fwd_off = {b for b, label in enumerate(mix)
                       if row_parts(method, label)[0] not in ("all", block)}
            assert zero_fwd.get(block, set()) == fwd_off, (mix, block)
        learns = {b for b, label in enumerate(mix) if row_parts(method, label)[2] != "units"}
        assert members(plan.wide) == learns, mix


def _dense_row_reference(x, w, go, mix, method, unit_ids):
    width = x.shape[-1]
    out = torch.empty(x.shape[0], x.shape[1], w.shape[0])
    grad_in, grad_w = torch.empty_like(x), torch.zeros_like(w)
    for b, label in enumerate(mix):
        fwd, dgrad, wgrad = (column_mask(p, unit_ids, width) for p in row_parts(method, label))
        out[:, b] = (x[:, b] * fwd) @ w.t()
        grad_in[:, b] = (go[:, b] @ w) * dgrad
        grad_w += go[:, b].t() @ (x[:, b] * wgrad)
    return out, grad_in, grad_w


@pytest.mark.parametrize("layout", ["one_run", "grid", "irregular", "none"])
@pytest.mark.parametrize("method", METHODS)
def test_row_linear_equals_dense_masked_reference_on_every_label_mix(method, layout):
    runs = LAYOUTS[layout]
    units, unit_ids = Units(runs, 16), members(runs)
    gen = torch.Generator().manual_seed(1)
    rule = linear_rule(method, "default", "fc2")
    for mix in label_mixes():
        x = torch.randn(3, BATCH, 16, generator=gen, requires_grad=True)
        w = torch.randn(5, 16, generator=gen, requires_grad=True)
        go = torch.randn(3, BATCH, 5, generator=gen)
        plan = RowPlan.of(routing_of(mix), rule, method == "sgtm")
        out = SeqRoutedRowLinear.apply(x, w, plan, units)
        out.backward(go)
        ref_out, ref_in, ref_w = _dense_row_reference(x.detach(), w.detach(), go, mix, method,
                                                      unit_ids)
        for got, want in ((out, ref_out), (x.grad, ref_in), (w.grad, ref_w)):
            torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["one_run", "grid", "irregular", "none"])
@pytest.mark.parametrize("method", METHODS)
def test_gated_forward_gives_its_input_back_bitwise(method, layout):
    """The row layer zeroes gated input columns in place for its GEMM. Its input here is an
    ``exp`` output, which ``exp``'s backward reads: it must be bitwise what it was, with no
    version bump (autograd would reject it), and every gradient still the dense reference's;
    so must a strided input, which takes the copy path instead."""
    runs = LAYOUTS[layout]
    units, unit_ids = Units(runs, 16), members(runs)
    gen = torch.Generator().manual_seed(3)
    rule = linear_rule(method, "default", "fc2")
    for mix in label_mixes():
        plan = RowPlan.of(routing_of(mix), rule, method == "sgtm")
        base = torch.randn(3, BATCH, 16, generator=gen, requires_grad=True)
        w = torch.randn(5, 16, generator=gen)
        go = torch.randn(3, BATCH, 5, generator=gen)
        for strided in (False, True):
            x = (base.exp() if not strided else
                 base.transpose(0, 1).contiguous().exp().transpose(0, 1))
            assert x.is_contiguous() != strided
            before, version = x.detach().clone(), x._version
            out = SeqRoutedRowLinear.apply(x, w, plan, units)
            assert x._version == version and torch.equal(x.detach(), before)
            out.backward(go)
            ref_out, ref_in, _ = _dense_row_reference(before, w, go, mix, method, unit_ids)
            torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(base.grad, ref_in * before, rtol=1e-5, atol=1e-5)
            base.grad = None


def test_forget_sequences_leave_retain_weight_columns_exactly_zero():
    """Not merely close: with only forget sequences carrying gradient, every retain column of
    the row weight's gradient (and every retain row of the column weight's) is exactly 0."""
    runs = LAYOUTS["grid"]
    units, unit_ids = Units(runs, 16), sorted(members(runs))
    retain_ids = sorted(set(range(16)) - set(unit_ids))
    mix = [FORGET, RETAIN, FORGET, UNLABELED]
    routing = routing_of(mix)
    go = torch.randn(3, BATCH, 16)
    go[:, [1, 3]] = 0.0  # only the forget sequences carry gradient
    x = torch.randn(3, BATCH, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    SeqRoutedRowLinear.apply(x, w, RowPlan.of(routing, linear_rule("sgtm", "default", "fc2"),
                                              True), units).backward(go)
    assert torch.count_nonzero(w.grad[:, retain_ids]) == 0
    assert torch.count_nonzero(w.grad[:, unit_ids]) > 0
    w.grad = None
    kept = merged(((b, b + 1) for b, label in enumerate(mix) if label != FORGET))
    SeqMaskedColumnLinear.apply(x, w, None, kept, units, True, False, None).backward(go)
    assert torch.count_nonzero(w.grad[retain_ids]) == 0
    assert torch.count_nonzero(w.grad[unit_ids]) > 0


@pytest.mark.parametrize("layout", ["one_run", "grid", "irregular", "none"])
def test_column_linear_equals_dense_masked_reference_on_every_label_mix(layout):
    runs = LAYOUTS[layout]
    units, unit_ids = Units(runs, 16), members(runs)
    gen = torch.Generator().manual_seed(2)
    for mix in label_mixes():
        x = torch.randn(3, BATCH, 5, generator=gen, requires_grad=True)
        w = torch.randn(16, 5, generator=gen, requires_grad=True)
        bias = torch.randn(16, generator=gen, requires_grad=True)
        go = torch.randn(3, BATCH, 16, generator=gen)
        kept = merged(((b, b + 1) for b, label in enumerate(mix) if label != FORGET))
        out = SeqMaskedColumnLinear.apply(x, w, bias, kept, units, True, False, None)
        out.backward(go)
        ref_w, ref_b = torch.zeros_like(w), torch.zeros_like(bias)
        for b, label in enumerate(mix):
            rows = column_mask("units" if label == FORGET else "all", unit_ids, 16)
            ref_w += (go[:, b] * rows).t() @ x[:, b].detach()
            ref_b += (go[:, b] * rows).sum(0)
        torch.testing.assert_close(out.detach(), x.detach() @ w.detach().t() + bias.detach())
        torch.testing.assert_close(x.grad, go @ w.detach())
        torch.testing.assert_close(w.grad, ref_w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bias.grad, ref_b, rtol=1e-5, atol=1e-5)


def test_weight_grad_with_sequences_updating_all_but_the_units():
    """``wide`` not inside ``unit`` (a sequence updating all but the units, whose sum has its
    unit slice zeroed before the others are added) must equal the dense sum too."""
    units = Units(LAYOUTS["grid"], 16)
    unit_ids = members(LAYOUTS["grid"])
    go, x = torch.randn(3, BATCH, 6), torch.randn(3, BATCH, 16)
    wide, unit = ((0, 3),), ((1, 4),)
    got = seq_weight_grad(go, x, wide, unit, units, on_rows=False)
    want = torch.zeros(6, 16)
    for b in range(BATCH):
        cols = torch.tensor([float((b in members(wide)) if c not in unit_ids
                                   else (b in members(unit))) for c in range(16)])
        want += go[:, b].t() @ (x[:, b] * cols)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
