"""MoE configs and forget-expert placement (pure: no process group, no megatron import).

Every bad MoE config is one clear error from the config loader, which `sgtm train` runs
before any rank starts; forget experts are placed so every expert-parallel size dividing
``partition.max_ep`` holds the same number per rank, with a global set independent of EP."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sgtm.config import CoreConfig
from megatron_sgtm.configbase import ConfigError, load_config
from megatron_sgtm.partition import PartitionError, build_partition
from megatron_sgtm.train.config import load_experiment

ROOT = Path(__file__).resolve().parents[1]
MOE = ["model.moe={num_experts: 8, top_k: 2}", "partition.forget_experts=2",
       "partition.forget_mlp_units=0", "model.add_bias_linear=false"]


def _one_problem(overrides, loader=None):
    with pytest.raises(ConfigError) as err:
        (loader or (lambda o: load_config(CoreConfig, None, o)))(MOE + overrides)
    assert len(err.value.problems) == 1, err.value.problems
    return err.value.problems[0]


@pytest.mark.parametrize("overrides,message", [
    (["partition.forget_experts=8"], "forget_experts 8 must be fewer than model.moe.num_experts 8"),
    (["expert_parallel=3"], "expert_parallel 3 does not divide model.moe.num_experts 8"),
    (["model.moe.top_k=7"], "top_k 7 exceeds the 6 retain experts"),
    (["routing.moe_forget=forced", "partition.forget_experts=1"],
     "forced sends each forget token to its top_k 2 among the 1 forget experts"),
    (["partition.forget_experts=1", "expert_parallel=2"],
     "1 forget experts cannot be split evenly over expert_parallel = 2"),
    (["routing.method=gradient_routing"], "gradient_routing is not defined for MoE blocks"),
    (["routing.variant=joint_projection"], "joint_projection is not defined for MoE blocks"),
    (["model.add_bias_linear=true"], "MoE needs model.add_bias_linear false"),
    (["tensor_parallel=2"], "MoE with tensor_parallel > 1 needs sequence_parallel true"),
    (["pipeline_parallel=2"], "MoE with pipeline_parallel > 1"),
    (["model.moe.dispatcher=alltoall"], "dispatcher alltoall needs expert_parallel > 1"),
    (["partition.forget_mlp_units=8"], "no dense MLP to hold forget units"),
    (["model.moe.top_k=9"], "top_k 9 exceeds num_experts 8"),
    (["model.moe.top_k=1"], "top_k 1 with a softmax over the chosen expert"),
])
def test_bad_moe_configs_give_one_clear_error(overrides, message):
    assert message in _one_problem(overrides)


def test_moe_settings_without_moe_are_refused():
    for overrides, message in ((["expert_parallel=2"], "needs model.moe"),
                               (["partition.forget_experts=1"], "needs model.moe")):
        with pytest.raises(ConfigError, match=message):
            load_config(CoreConfig, None, overrides)


def test_deepspeed_and_process_counts_are_refused_for_moe():
    train = lambda o: load_experiment(None, ["data.dir=x"] + o)  # noqa: E731
    assert "deepspeed does not train MoE models" in _one_problem(["engine.name=deepspeed"], train)
    cfg = train(MOE + ["expert_parallel=2", "train.micro_batch_size=2",
                       "train.global_batch_size=8"])
    assert cfg.batch_plan(2) == (2, 2)
    with pytest.raises(ConfigError, match="not divisible by expert_parallel 2"):
        cfg.batch_plan(1)


def test_alltoall_dispatcher_is_refused_without_cuda():
    from megatron_sgtm.train.errors import TrainError
    from megatron_sgtm.train.fastpath import check_device

    cfg = load_experiment(None, ["data.dir=x"] + MOE + ["expert_parallel=2",
                                                         "model.moe.dispatcher=alltoall"])
    check_device(cfg, cuda=True)
    with pytest.raises(TrainError, match="alltoall needs CUDA"):
        check_device(cfg, cuda=False)


def test_sgtm_train_refuses_a_bad_moe_config_before_starting(capsys):
    from megatron_sgtm.train.cli import main

    code = main(["--config", str(ROOT / "configs/train/tiny_cpu.yaml"), "--nproc", "2",
                 *MOE, "partition.forget_experts=8"])
    err = capsys.readouterr()
    assert code == 2 and "torchrun" not in err.out
    lines = [line for line in err.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "1 problem" in lines[0], err.err
    assert "must be fewer than model.moe.num_experts" in err.err


def test_good_moe_config_loads():
    cfg = load_config(CoreConfig, None, MOE + ["expert_parallel=2", "routing.moe_forget=forced"])
    assert cfg.model.moe.num_experts == 8 and cfg.expert_parallel == 2
    assert cfg.model.moe.expert_width(cfg.model.ffn_hidden_size) == cfg.model.ffn_hidden_size


def _partition(experts: int, forget: int, **kwargs):
    cfg = load_config(CoreConfig, None, [f"model.moe={{num_experts: {experts}, top_k: 1, pre_softmax: true}}",
                                         f"partition.forget_experts={forget}",
                                         "partition.forget_mlp_units=0",
                                         "model.add_bias_linear=false"] +
                      [f"partition.{k}={v}" for k, v in kwargs.items()])
    return build_partition(cfg.model, cfg.partition, cfg.routing)


@pytest.mark.parametrize("experts,forget", [(64, 8), (16, 4), (8, 8 - 1), (32, 2)])
def test_every_dividing_ep_holds_the_same_number_of_forget_experts(experts, forget):
    part = _partition(experts, forget)
    assert len(part.forget_experts) == forget
    for ep in (1, 2, 4, 8):
        try:
            part.check_ep(ep)
        except PartitionError:
            assert forget % ep, f"EP {ep} refused although {forget} forget experts split evenly"
            continue
        per_rank = [part.local_forget_experts(ep, r) for r in range(ep)]
        assert len({len(p) for p in per_rank}) == 1
        # The local ids map back to the same global set at every EP size.
        assert {r * experts // ep + i for r, p in enumerate(per_rank) for i in p} == \
            set(part.forget_experts)


def test_placement_is_block_strided_or_last():
    assert _partition(8, 2).forget_experts == (3, 7)
    assert _partition(8, 1).forget_experts == (7,)
    assert _partition(8, 2, placement="last").forget_experts == (6, 7)
    assert _partition(16, 4, max_ep=2).forget_experts == (6, 7, 14, 15)


def test_checkpoint_metadata_has_expert_keys_only_for_moe():
    dense = build_partition(*(lambda c: (c.model, c.partition, c.routing))(
        load_config(CoreConfig, None, [])))
    assert "forget_experts" not in dense.to_metadata()
    meta = _partition(8, 2).to_metadata()
    assert meta["forget_experts"] == [3, 7] and meta["num_experts"] == 8
    assert meta["moe_layers"] == [0, 1]


def test_layer_freq_makes_every_kth_block_moe():
    cfg = load_config(CoreConfig, None, ["model.num_layers=5",
                                         "model.moe={num_experts: 4, top_k: 1, layer_freq: 2, pre_softmax: true}",
                                         "partition.forget_experts=1",
                                         "model.add_bias_linear=false"])
    part = build_partition(cfg.model, cfg.partition, cfg.routing)
    assert part.moe_layers == (0, 2, 4) and part.forget_mlp  # dense blocks keep forget units
    part_some = build_partition(cfg.model, type(cfg.partition)(
        **{**vars(cfg.partition), "layers": [1, 2]}), cfg.routing)
    assert part_some.expert_layers == (2,)


def test_plan_counts_experts_per_expert_parallel_rank():
    from dataclasses import replace

    from megatron_sgtm.plan import (Layout, active_block_params, block_params, model_params,
                                    plan_stage)

    cfg = load_experiment(ROOT / "configs/train/moe_1b7b_h100x8.yaml")
    m = cfg.model
    h, f = m.hidden_size, m.moe.expert_width(m.ffn_hidden_size)
    attention = 2 * h + 4 * h * h  # RMSNorms, q/k/v/o (MHA, no biases)
    expert = 3 * h * f  # SwiGLU: gate, up, down
    assert block_params(m, 0, tp=1, ep=1) == attention + 64 * h + 64 * expert
    assert block_params(m, 0, tp=1, ep=8) == attention + 64 * h + 8 * expert
    assert active_block_params(m) == 16 * (attention + 64 * h + 8 * expert)
    assert model_params(m) == 16 * block_params(m, 0) + 2 * 50304 * h + h
    # The distributed optimizer shards dense state over DP, expert state over DP / EP.
    layout = Layout.of(cfg, 16)  # DP 16, EP 8: expert data parallelism 2
    stage = plan_stage(m, layout, 0)
    experts = 16 * 8 * expert
    assert stage.optimizer == -(-12 * (stage.params - experts) // 16) + 12 * experts // 2
    assert plan_stage(m, replace(layout, distributed_optimizer=False), 0).optimizer == \
        12 * stage.params


def test_sgtm_plan_prints_the_moe_layout(capsys):
    from megatron_sgtm.plan_cli import main

    assert main([str(ROOT / "configs/train/moe_1b7b_h100x8.yaml"), "--gpus", "8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "64 swiglu experts of width 1024, top-8, EP 8" in out and "routed experts" in out


def test_mixtral_export_refuses_what_mixtral_cannot_express():
    from megatron_sgtm.post.export_hf import ExportError, to_mixtral

    core = load_config(CoreConfig, None, MOE + [
        "model.moe.shared_expert=32", "model.moe.score_function=sigmoid", "model.num_layers=2",
        "model.moe.layer_freq=2", "partition.forget_mlp_units=8"])
    with pytest.raises(ExportError) as err:
        to_mixtral({}, core)
    for why in ("every block must be an MoE block", "no shared expert",
                "softmax over their logits"):
        assert why in str(err.value)


def test_post_hoc_commands_read_an_expert_parallel_alltoall_checkpoint_at_ep1(tmp_path):
    """A checkpoint trained at EP 2 with the alltoall dispatcher (GPU) is rebuilt at EP 1 with
    allgather for ablation and evaluation (the dispatcher changes no result)."""
    from megatron_sgtm.configbase import config_to_dict
    from megatron_sgtm.post.ckpt_io import core_config

    stored = load_experiment(None, ["data.dir=x"] + MOE + [
        "expert_parallel=2", "model.moe.dispatcher=alltoall", "model.params_dtype=bf16"])
    core = core_config({"config": config_to_dict(stored)}, tmp_path, 1)
    assert (core.expert_parallel, core.model.moe.dispatcher) == (1, "allgather")
    assert core.model.params_dtype == "fp32" and core.partition.forget_experts == 2
