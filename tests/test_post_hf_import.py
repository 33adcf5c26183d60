"""The safetensors import path refuses what it cannot load exactly, and pickles unread
(round trips and commands on real exports: test_post_models.py, test_checkpoint_security.py)."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from megatron_sgtm.post import hf_import
from megatron_sgtm.post.ckpt_io import PostError

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64,
        "vocab_size": 96, "n_positions": 16, "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "intermediate_size": 64, "vocab_size": 96, "max_position_embeddings": 16,
         "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}


def test_configs_map_to_the_exact_model(tmp_path):
    gpt2 = hf_import.model_from_hf_config(GPT2, tmp_path)
    assert (gpt2.hidden_size, gpt2.ffn_hidden_size, gpt2.activation, gpt2.add_bias_linear) == (
        32, 64, "gelu", True)
    llama = hf_import.model_from_hf_config(LLAMA, tmp_path)
    assert (llama.query_groups, llama.head_dim, llama.activation, llama.tie_embeddings) == (
        2, 8, "swiglu", False)


@pytest.mark.parametrize("config,message", [
    (dict(GPT2, activation_function="gelu_new"), "activation_function='gelu_new' has no exact"),
    (dict(LLAMA, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling="),
    (dict(LLAMA, mlp_bias=True), "attention_bias and mlp_bias differ"),
    ({"model_type": "bert"}, "model_type 'bert' is not one this project exports"),
    ({k: v for k, v in GPT2.items() if k != "n_layer"}, "config.json lacks 'n_layer'"),
])
def test_what_has_no_exact_equivalent_is_refused(tmp_path, config, message):
    with pytest.raises(PostError, match=message):
        hf_import.model_from_hf_config(config, tmp_path)


def test_pickle_weights_are_refused_unread(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    assert hf_import.is_hf_export(tmp_path)
    with pytest.raises(PostError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors"):
        hf_import.read_safetensors(tmp_path)
