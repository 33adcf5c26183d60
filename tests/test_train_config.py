"""Experiment configs: bases, derived routing, every problem in one error, batch plan."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sgtm.configbase import ConfigError
from megatron_sgtm.train.config import ROUTING_OF, load_experiment
from megatron_sgtm.train.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"


def test_shipped_configs_load():
    tiny = load_experiment(ROOT / "configs/train/tiny_cpu.yaml")
    assert tiny.model.num_layers == 2 and tiny.model.hidden_size == 64
    assert tiny.routing.method == "sgtm"
    gpu = load_experiment(ROOT / "configs/train/64m_gpu.yaml")
    assert (gpu.model.num_layers, gpu.model.hidden_size, gpu.model.ffn_hidden_size,
            gpu.model.num_attention_heads, gpu.model.seq_length) == (12, 512, 2048, 32, 512)
    assert gpu.batch_plan(8) == (8, 1)
    shapes = {"8m": (6, 128), "18m": (6, 256), "34m": (8, 384), "64m": (12, 512),
              "125m": (12, 768), "254m": (16, 1024)}
    for name, (layers, hidden) in shapes.items():
        cfg = load_experiment(MODELS / f"{name}.yaml", ["data.dir=x"])
        assert (cfg.model.num_layers, cfg.model.hidden_size) == (layers, hidden)
        assert (cfg.partition.forget_heads, cfg.partition.forget_mlp_units) == (1, 64)
    big = load_experiment(MODELS / "254m.yaml", ["data.dir=x"])
    assert (big.model.ffn_hidden_size, big.model.seq_length) == (4096, 1024)


@pytest.mark.parametrize("method", sorted(ROUTING_OF))
def test_routing_is_derived_from_the_data_method(method):
    cfg = load_experiment(MODELS / "tiny.yaml", ["data.dir=x", f"data.method={method}"])
    assert cfg.routing.method == ROUTING_OF[method]


def test_disagreeing_routing_method_is_refused():
    with pytest.raises(ConfigError, match="disagrees with data.method 'weak_filter'"):
        load_experiment(MODELS / "tiny.yaml", ["data.dir=x", "data.method=weak_filter",
                                               "routing.method=sgtm"])


def test_unknown_keys_all_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: " + str(MODELS / "tiny.yaml") + "\ndata: {dir: x, methd: sgtm}\n"
                    "train: {stepz: 3}\nengine: {zero_stage: 3}\nloging: {}\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    text = str(err.value)
    for fragment in ("data.methd: unknown key", "train.stepz: unknown key",
                     "engine.zero_stage: must be 1 or 2", "loging: unknown key"):
        assert fragment in text
    assert len(err.value.problems) == 4


def test_indivisible_partition_and_batch():
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        load_experiment(MODELS / "tiny.yaml", ["data.dir=x", "partition.forget_heads=1",
                                               "tensor_parallel=2"])
    cfg = load_experiment(MODELS / "tiny.yaml", ["data.dir=x", "train.micro_batch_size=4",
                                                 "train.global_batch_size=8"])
    assert cfg.batch_plan(1) == (1, 2) and cfg.batch_plan(2) == (2, 1)
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size x data-parallel"):
        cfg.batch_plan(4)


def test_yaml_off_means_no_wandb(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {MODELS / 'tiny.yaml'}\ndata: {{dir: x}}\nlogging: {{wandb: off}}\n")
    assert load_experiment(path).logging.wandb == "off"


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = load_experiment(MODELS / "tiny.yaml", ["data.dir=x", "train.lr=1.0", "train.min_lr=0.1",
                                                 "train.warmup_steps=4", "train.steps=14"])
    lrs = [lr_at(s, cfg.train) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(14, cfg.train) == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.55)  # halfway through the cosine


def test_compile_settings_are_checked_at_load():
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["data.dir=x", "train.compile_mode=fastest"])
    assert "train.compile_mode: 'fastest' is not 'default' | 'reduce-overhead'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["data.dir=x", "train.compile_mode=reduce-overhead",
                               "train.compile_backend=aot_eager"])
    assert "applies to the inductor backend, not 'aot_eager'" in str(err.value)
    cfg = load_experiment(None, ["data.dir=x", "train.compile=true",
                                 "train.compile_mode=reduce-overhead"])
    assert cfg.train.compile_on(cuda=False) and cfg.train.compile_mode == "reduce-overhead"
