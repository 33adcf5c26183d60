"""Typed configs: YAML + overrides, every problem reported at once."""
from __future__ import annotations

import pytest
import torch

from megatron_sgtm.config import CoreConfig
from megatron_sgtm.configbase import ConfigError, load_config, parse_overrides
from megatron_sgtm.routing import TokenRouting


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_plus_overrides(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: 128\n  num_attention_heads: 4\n")
    cfg = load_config(CoreConfig, path, ["model.num_layers=3", "routing.variant=joint_projection",
                                         "partition.layers=[0,2]"])
    assert cfg.model.hidden_size == 128 and cfg.model.num_layers == 3
    assert cfg.routing.variant == "joint_projection" and cfg.partition.layers == [0, 2]


def test_every_problem_in_one_error(tmp_path):
    path = write(tmp_path, "model:\n  hidden_sise: 128\n  activation: relu\n"
                           "routing:\n  method: sgtmm\ntensor_paralel: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(CoreConfig, path, ["partition.forget_heads=two"])
    text = str(err.value)
    for fragment in ("model.hidden_sise: unknown key", "model.activation: 'relu' is not one of",
                     "routing.method: 'sgtmm'", "tensor_paralel: unknown key",
                     "partition.forget_heads: expected an integer"):
        assert fragment in text
    assert len(err.value.problems) == 5


def test_indivisible_partition_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        load_config(CoreConfig, None, ["tensor_parallel=2", "model.num_attention_heads=8",
                                       "partition.forget_heads=1", "partition.forget_mlp_units=8"])


def test_full_recompute_is_accepted_and_checked_against_the_chunk_layers():
    cfg = load_config(CoreConfig, None, ["model.activation_recompute=full"])
    assert cfg.model.activation_recompute == "full"
    with pytest.raises(ConfigError, match="recompute_num_layers 3 does not divide the 2 layers"):
        load_config(CoreConfig, None, ["model.activation_recompute=full",
                                       "model.recompute_num_layers=3"])


@pytest.mark.parametrize("overrides,message", [
    (["sequence_parallel=true"], "sequence_parallel needs tensor_parallel > 1"),
    (["sequence_parallel=true", "tensor_parallel=2", "model.seq_length=63"],
     "seq_length 63 is not divisible by tensor_parallel 2"),
    (["pipeline_parallel=3"], "pipeline_parallel 3 exceeds model.num_layers 2"),
    (["pipeline_parallel=2", "model.num_layers=3"],
     "num_layers 3 is not divisible by pipeline_parallel 2 = 2 model chunks"),
    (["pipeline_parallel=2", "virtual_pipeline_parallel=2", "model.num_layers=6"],
     "num_layers 6 is not divisible by pipeline_parallel 2 x virtual_pipeline_parallel 2"),
    (["virtual_pipeline_parallel=2"], "needs at least 2 chunks per stage and pipeline_parallel"),
    (["pipeline_parallel=0"], "pipeline_parallel: must be positive"),
])
def test_model_parallel_layout_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CoreConfig, None, overrides)


def test_model_parallel_layout_accepted():
    cfg = load_config(CoreConfig, None, ["tensor_parallel=2", "sequence_parallel=true",
                                         "pipeline_parallel=2", "virtual_pipeline_parallel=2",
                                         "model.num_layers=8", "partition.forget_heads=2"])
    assert (cfg.model_parallel, cfg.layers_per_chunk) == (4, 2)


def test_cross_field_checks():
    with pytest.raises(ConfigError) as err:
        load_config(CoreConfig, None, ["model.hidden_size=30", "model.num_attention_heads=8"])
    assert "not divisible by num_attention_heads" in str(err.value)
    with pytest.raises(ConfigError, match="applies to method 'sgtm' only"):
        load_config(CoreConfig, None, ["routing.method=gradient_routing",
                                       "routing.variant=joint_attention"])
    with pytest.raises(ConfigError, match="exceeds"):
        load_config(CoreConfig, None, ["partition.forget_mlp_units=100000"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CoreConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(CoreConfig, write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["model.hidden_size"])


def test_routing_labels_are_checked():
    with pytest.raises(ValueError, match="codes other than 0/1/2"):
        TokenRouting(torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        TokenRouting(torch.tensor([0, 1]))
    routing = TokenRouting(torch.tensor([[0, 0], [2, 2], [1, 1]]))
    # megatron's [s, b] order: token (s=0, b=1) is index 1
    assert routing.forget_index("cpu").tolist() == [1, 4]
    assert routing.kept_index("cpu").tolist() == [0, 2, 3, 5]
