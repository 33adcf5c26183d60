"""Initial weights depend on the seed and each parameter's global name and shape only: every
TP / PP / VP layout builds, bit for bit, the TP=1 model (tied output copy included), and the
blockwise draw of a shard equals the same rows or columns of the whole tensor."""
from __future__ import annotations

import pytest
import torch

from _workers_pipeline import initial_params
from distributed import run_distributed
from megatron_sgtm import init
from megatron_sgtm.post.layout import shard

FAMILIES = ["mha_gelu", "gqa_swiglu"]


@pytest.fixture(scope="module")
def built():
    out = run_distributed(initial_params, 1, ["tp1"], FAMILIES)[0]
    for rank in run_distributed(initial_params, 2, ["tp2_sp", "pp2", "pp2_vp2"], FAMILIES):
        for key, params in rank.items():
            out.setdefault(key, {}).update(params)
    return out


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2", "pp2_vp2"])
def test_every_layout_builds_the_tp1_model_bit_for_bit(built, layout):
    for family in FAMILIES:
        ref, got = built[("tp1", family)], built[(layout, family)]
        plain = {k: v for k, v in got.items() if not k.startswith("copy:")}
        assert plain.keys() == ref.keys(), (layout, family)
        different = [k for k in ref if not torch.equal(ref[k], plain[k])]
        assert not different, f"{layout} {family}: {different}"
        for key, value in got.items():  # the last stage's copy of tied embeddings
            if key.startswith("copy:"):
                assert torch.equal(value, ref[key[len("copy:"):]]), (layout, family, key)


def test_tied_copy_exists_under_pipelines_and_the_draws_are_distinct(built):
    assert "copy:embedding.word_embeddings.weight" in built[("pp2", "mha_gelu")]
    ref = built[("tp1", "gqa_swiglu")]
    weights = [v for k, v in ref.items() if v.dim() == 2]
    # No two parameters share a stream (same-shape layers would otherwise start equal).
    flat = {tuple(w.flatten()[:8].tolist()) for w in weights}
    assert len(flat) == len(weights)
    std = ref["decoder.layers.0.mlp.linear_fc1.weight"].std().item()
    assert std == pytest.approx(0.02, rel=0.1)
    scaled = ref["decoder.layers.0.mlp.linear_fc2.weight"].std().item()
    assert scaled == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.15)
    assert torch.equal(ref["decoder.final_layernorm.weight"],
                       torch.ones_like(ref["decoder.final_layernorm.weight"]))


def _param(shape, dim=None, stride=1):
    p = torch.nn.Parameter(torch.empty(shape))
    if dim is not None:
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
    return p


@pytest.mark.parametrize("name,full_shape,dim,stride", [
    ("decoder.layers.3.self_attention.linear_qkv.weight", (384, 40), 0, 1),
    ("decoder.layers.3.mlp.linear_fc1.weight", (260, 40), 0, 2),  # gated: [gate; up]
    ("decoder.layers.3.mlp.linear_fc2.weight", (40, 260), 1, 1),
    ("decoder.layers.3.mlp.linear_fc1.bias", (260,), 0, 2),
])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_shard_is_drawn_as_the_slice_of_the_whole_tensor(name, full_shape, dim, stride, tp):
    """Against post/layout.py's independent split rule (the one the HF export uses)."""
    if full_shape[dim] % (tp * stride):
        pytest.skip("not divisible")
    whole = _param(full_shape, dim, stride)
    d, total, idx = init.shard_indices(whole, 1, 0)
    rest = tuple(s for i, s in enumerate(full_shape) if i != d)
    full = init.draw_normal(5, name, d, total, idx, rest)
    assert full.shape == full_shape
    gated = stride == 2
    for rank in range(tp):
        local_shape = list(full_shape)
        local_shape[dim] //= tp
        part = _param(tuple(local_shape), dim, stride)
        d, total, idx = init.shard_indices(part, tp, rank)
        got = init.draw_normal(5, name, d, total, idx, rest)
        assert torch.equal(got, shard(name, full, tp, rank, gated)), (tp, rank)


def test_every_parameter_needs_a_rule():
    with pytest.raises(init.InitError, match="decoder.layers.0.mlp.shared_experts.gate_weight"):
        init.rule_for("decoder.layers.0.mlp.shared_experts.gate_weight", 0.02, 2)
    assert init.rule_for("decoder.layers.0.mlp.router.weight", 0.02, 2) == init.Rule("normal", 0.02)
    fc2 = init.rule_for("decoder.layers.1.mlp.experts.local_experts.5.linear_fc2.weight", 0.02, 2)
    assert fc2 == init.Rule("normal", 0.01)
    assert init.rule_for("decoder.layers.1.input_layernorm.weight", 0.02, 2).kind == "ones"
    assert init.rule_for("output_layer.bias", 0.02, 2).kind == "zeros"


def test_the_seed_and_the_name_choose_the_stream():
    a = init.stream_seed(1, "x.weight", 0)
    assert a == init.stream_seed(1, "x.weight", 0)
    assert len({a, init.stream_seed(2, "x.weight", 0), init.stream_seed(1, "y.weight", 0),
                init.stream_seed(1, "x.weight", 1)}) == 4
