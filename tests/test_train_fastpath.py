"""The fast-path pieces that run on any device: deferred loss reads, the fused-AdamW switch,
and the device defaults for dtype and compile."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from megatron_sgtm.config import ModelConfig
from megatron_sgtm.train.config import TrainConfig
from megatron_sgtm.train.engine import _switch_to_fused
from megatron_sgtm.train.errors import NonFiniteLoss
from megatron_sgtm.train.losswatch import LossWatch


def test_losswatch_reads_every_pending_step_once():
    watch = LossWatch()
    for step, value in enumerate([3.0, 2.5, 2.0], start=1):
        watch.add(step, torch.tensor(value))
    assert watch.read() == [3.0, 2.5, 2.0]
    assert watch.last == 2.0
    assert watch.read() == []  # nothing pending: no transfer, last unchanged
    assert watch.last == 2.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_losswatch_names_the_first_non_finite_step(bad):
    watch = LossWatch(checkpoint_dir="ck")
    for step, value in enumerate([3.0, bad, 1.0, math.nan], start=11):
        watch.add(step, torch.tensor(value))
    with pytest.raises(NonFiniteLoss) as err:
        watch.read()
    message = str(err.value)
    assert f"loss is {bad} at step 12 (seen at step 14)" in message
    assert "the last good checkpoint stays in ck" in message
    assert err.value.exit_code == 3


def _adamw_pair():
    torch.manual_seed(0)
    weights = [torch.randn(8, 4), torch.randn(4)]
    grads = [torch.randn_like(w) for w in weights]
    made = []
    for fused in (None, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1},
                                 {"params": params[1:], "weight_decay": 0.0}],
                                lr=1e-2, fused=fused)
        made.append((params, opt))
    return grads, made


def test_switch_to_fused_steps_like_an_optimizer_built_fused():
    grads, [(params, switched), (ref_params, ref)] = _adamw_pair()
    _switch_to_fused(switched)
    assert all(g["fused"] and not g["foreach"] for g in switched.param_groups)
    for _ in range(3):
        for opt, ps in ((switched, params), (ref, ref_params)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for p, r in zip(params, ref_params):
        assert torch.equal(p, r)
    assert switched.state[params[0]]["step"].device == params[0].device


def test_switch_to_fused_leaves_a_stepped_or_foreign_optimizer_alone():
    _, [(params, opt), _] = _adamw_pair()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    _switch_to_fused(opt)  # state exists: its step counters are host tensors, keep the path
    assert not any(g["fused"] for g in opt.param_groups)
    sgd = torch.optim.SGD(params, lr=0.1)
    _switch_to_fused(sgd)
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]


def test_device_defaults():
    assert ModelConfig().dtype_on(cuda=True) == "bf16"
    assert ModelConfig().dtype_on(cuda=False) == "fp32"
    assert ModelConfig(params_dtype="fp32").dtype_on(cuda=True) == "fp32"
    assert TrainConfig().compile_on(cuda=True) and not TrainConfig().compile_on(cuda=False)
    assert TrainConfig(compile=True).compile_on(cuda=False)
    assert not TrainConfig(compile=False).compile_on(cuda=True)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                    reason="checks the refusal where Transformer Engine is absent")
def test_te_attention_without_te_is_one_clear_error():
    from megatron_sgtm.model import layer_spec

    with pytest.raises(ValueError, match="attention_backend te needs Transformer Engine"):
        layer_spec("te")
    assert layer_spec("sdpa") is not None
