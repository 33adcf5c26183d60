"""Pure partition math, plus the real model's shards at TP up to 8 (fake process group)."""
from __future__ import annotations

import pytest

from distributed import run_distributed
from megatron_sgtm.config import ModelConfig, PartitionConfig, RoutingConfig
from megatron_sgtm.partition import PartitionError, block_strided_ids, build_partition, to_runs

PAPER_254M = ModelConfig(num_layers=16, hidden_size=1024, num_attention_heads=32,
                         ffn_hidden_size=4096, vocab_size=50304, seq_length=1024)


def test_block_strided_is_balanced_and_at_block_ends():
    ids = block_strided_ids(4096, 64, 8)
    assert len(ids) == 64 and len(set(ids)) == 64
    per_block = [sum(1 for i in ids if b * 512 <= i < (b + 1) * 512) for b in range(8)]
    assert per_block == [8] * 8
    assert all(i % 512 >= 504 for i in ids)


def test_single_forget_head_goes_last_and_spreads_when_few():
    assert block_strided_ids(32, 1, 8) == (31,)
    assert block_strided_ids(32, 2, 8) == (15, 31)
    assert block_strided_ids(32, 0, 8) == ()


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_rank_holds_the_same_forget_count(tp):
    part = build_partition(PAPER_254M, PartitionConfig(forget_heads=8, forget_mlp_units=64))
    locals_ = [part.local(tp, r) for r in range(tp)]
    assert len({len(lp.qkv_rows) for lp in locals_}) == 1
    assert len({len(lp.fc1_rows) for lp in locals_}) == 1
    assert sum(len(lp.fc2_cols) for lp in locals_) == 64


def test_global_set_does_not_depend_on_tp():
    part = build_partition(PAPER_254M, PartitionConfig(forget_heads=8, forget_mlp_units=64))
    for tp in (1, 2, 4, 8):
        units = set()
        for r in range(tp):
            lp = part.local(tp, r)
            units |= {r * (4096 // tp) + u for u in lp.fc2_cols}
        assert units == set(part.forget_mlp)


def test_qkv_rows_follow_megatrons_group_layout():
    model = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=32)
    part = build_partition(model, PartitionConfig(forget_heads=2, forget_mlp_units=4, max_tp=2))
    assert part.forget_groups == (1, 3)
    lp = part.local(2, 1)  # rank 1 owns groups 2, 3: local group 1 is global group 3
    rows_per_group = (2 + 2) * 8  # two query heads + k + v, head_dim 8
    assert lp.qkv_rows == tuple(range(rows_per_group, 2 * rows_per_group))
    assert lp.proj_cols == tuple(range(16, 32))


def test_swiglu_fc1_masks_gate_and_up():
    model = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=16,
                        activation="swiglu")
    part = build_partition(model, PartitionConfig(forget_heads=0, forget_mlp_units=2, max_tp=2))
    lp = part.local(2, 0)
    assert lp.fc2_cols == (7,)
    assert lp.fc1_rows == (7, 15)  # local shard is [gate_local(8); up_local(8)]
    assert lp.fc1_size == 16


def test_runs_are_contiguous():
    assert to_runs([5, 1, 2, 3, 7, 6]) == ((1, 4), (5, 8))


def test_paper_placement_puts_everything_last():
    part = build_partition(PAPER_254M, PartitionConfig(forget_heads=1, placement="last"))
    assert part.forget_groups == (31,)
    assert part.forget_mlp == tuple(range(4032, 4096))


@pytest.mark.parametrize("tp,fragment", [
    (3, "not divisible by tensor_parallel = 3"),
    (2, "cannot be split evenly"),
])
def test_indivisible_partitions_fail_fast(tp, fragment):
    part = build_partition(PAPER_254M, PartitionConfig(forget_heads=1, forget_mlp_units=64))
    with pytest.raises(PartitionError, match=fragment):
        part.check_tp(tp)


def test_query_groups_must_divide_tp():
    model = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                        ffn_hidden_size=64)
    part = build_partition(model, PartitionConfig(forget_heads=0, forget_mlp_units=8))
    with pytest.raises(PartitionError, match="num_query_groups"):
        part.check_tp(4)


def test_joint_attention_has_no_forget_heads():
    part = build_partition(PAPER_254M, PartitionConfig(forget_heads=1),
                           RoutingConfig(variant="joint_attention"))
    assert part.forget_groups == ()


def _shards_at_scale(rank, world):
    """Build the real 254M-wide model (one layer) for every rank at TP 1..8 on a fake group."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_sgtm.config import CoreConfig
    from megatron_sgtm.cpu_shims import apply_cpu_shims
    from megatron_sgtm.model import build_model

    apply_cpu_shims()
    wide = ModelConfig(num_layers=1, hidden_size=1024, num_attention_heads=32,
                       ffn_hidden_size=4096, vocab_size=512, seq_length=64, activation="swiglu")
    report = {}
    for tp in (1, 2, 4, 8):
        for r in range(tp):
            dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=tp)
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                     create_gloo_process_groups=False)
            core = CoreConfig(model=wide, partition=PartitionConfig(forget_heads=8,
                              forget_mlp_units=64), tensor_parallel=tp)
            model = build_model(core)
            layer = model.decoder.layers[0]
            fc2 = layer.mlp.linear_fc2
            qkv = layer.self_attention.linear_qkv
            per_rank_units = fc2.weight.shape[1]
            report[(tp, r)] = {
                "qkv": len(qkv._sgtm_units), "fc1": len(layer.mlp.linear_fc1._sgtm_units),
                "global_mlp": sorted(r * per_rank_units + u for u in fc2._sgtm_units),
                "qkv_rows_in_shard": max(qkv._sgtm_units) < qkv.weight.shape[0],
            }
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return report


def test_real_model_shards_at_tp_up_to_8():
    report = run_distributed(_shards_at_scale, 1)[0]
    for tp in (1, 2, 4, 8):
        ranks = [report[(tp, r)] for r in range(tp)]
        assert len({x["qkv"] for x in ranks}) == 1 and len({x["fc1"] for x in ranks}) == 1
        assert all(x["qkv_rows_in_shard"] for x in ranks)
        assert sorted(u for x in ranks for u in x["global_mlp"]) == sorted(
            report[(1, 0)]["global_mlp"])
        assert ranks[0]["fc1"] == 2 * 64 // tp  # gate and up rows of each forget unit
