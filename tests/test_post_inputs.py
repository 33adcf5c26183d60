"""Bad inputs to the post-training tools each give one clear error."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig
from megatron_sgtm.data import DataError
from megatron_sgtm.partition import build_partition
from megatron_sgtm.post import ckpt_io, shards
from megatron_sgtm.post.ablate import PruneError, pruned_core

CORE = CoreConfig(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=8,
                                    ffn_hidden_size=64, vocab_size=96, seq_length=12),
                  partition=PartitionConfig(forget_heads=2, forget_mlp_units=8, max_tp=2))


def _meta(**extra):
    from megatron_sgtm.configbase import config_to_dict

    meta = {"config": config_to_dict(CORE), "step": 3}
    meta.update(extra)
    return meta


def _partition():
    return build_partition(CORE.model, CORE.partition, CORE.routing).to_metadata()


def test_core_config_round_trips_from_metadata(tmp_path):
    core = ckpt_io.core_config(_meta(), tmp_path, tensor_parallel=2)
    # Post-hoc tools always build fp32 models, whatever dtype the run trained in.
    assert core.model == dataclasses.replace(CORE.model, params_dtype="fp32")
    assert core.tensor_parallel == 2
    trained_bf16 = _meta()
    trained_bf16["config"]["model"]["params_dtype"] = "bf16"
    assert ckpt_io.core_config(trained_bf16, tmp_path, 1).model.params_dtype == "fp32"
    nested = {"config": {"core": _meta()["config"], "optim": {"lr": 1.0}}}
    assert ckpt_io.core_config(nested, tmp_path, 1).partition == CORE.partition


def test_checkpoint_without_partition_metadata_is_refused(tmp_path):
    with pytest.raises(ckpt_io.PostError, match="no partition metadata"):
        ckpt_io.check_partition(_meta(), CORE, tmp_path)
    assert ckpt_io.check_partition(_meta(partition=_partition()), CORE, tmp_path)


def test_checkpoint_with_other_partition_is_refused(tmp_path):
    other = dict(_partition(), forget_mlp=[0, 1])
    with pytest.raises(ckpt_io.PostError, match="does not match"):
        ckpt_io.check_partition(_meta(partition=other), CORE, tmp_path)


def test_checkpoint_config_unusable_at_this_tp_is_refused(tmp_path):
    with pytest.raises(ckpt_io.PostError, match="tensor_parallel=3"):
        ckpt_io.core_config(_meta(), tmp_path, tensor_parallel=3)


def test_tokenizer_mismatch_is_refused(tmp_path):
    meta = _meta()
    meta["config"]["data"] = {"path": "x", "tokenizer_sha256": "a" * 64}
    with pytest.raises(ckpt_io.PostError, match="tokenizer mismatch"):
        ckpt_io.check_tokenizer(meta, {"tokenizer": {"sha256": "b" * 64}}, tmp_path, tmp_path)
    ckpt_io.check_tokenizer(meta, {"tokenizer": {"sha256": "a" * 64}}, tmp_path, tmp_path)


def _write_split(directory, split, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for kind, dtype, fill in (("tokens", np.uint16, None), ("labels", np.uint8, 1)):
        builder = IndexedDatasetBuilder(str(directory / f"{split}_{kind}.bin"), dtype=dtype)
        for doc in docs:
            arr = np.asarray(doc if fill is None else [fill] * len(doc), dtype=dtype)
            builder.add_document(torch.from_numpy(arr), [len(arr)])
        builder.finalize(str(directory / f"{split}_{kind}.idx"))
    np.save(directory / f"{split}_truth.npy", np.zeros(len(docs), np.uint8))


def test_empty_or_missing_eval_split_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": "a",
                                                                     "vocab_size": 16}}))
    _write_split(tmp_path, "test_forget", [])
    _write_split(tmp_path, "test_retain", [[5, 6, 7, 1]] * 10)
    # The post commands read through the training reader, so its checks and messages apply.
    with pytest.raises(DataError, match="test_forget_tokens.bin: empty"):
        shards.eval_sets(tmp_path, seq=4, batch_size=2, max_sequences=None)
    with pytest.raises(DataError, match="test_adjacent_tokens.idx: missing"):
        shards.sequences(tmp_path, "test_adjacent", 4)
    with pytest.raises(DataError, match="'test_retain' \\(truth 1\\) has 0 tokens"):
        shards.sequences(tmp_path, "test_retain", 4, truth=1)
    retain = shards.sequences(tmp_path, "test_retain", 4)
    assert retain.shape == (8, 5) and retain[0].tolist() == [5, 6, 7, 1, 5]


def test_prune_refuses_what_it_cannot_do_exactly():
    partial = CoreConfig(model=CORE.model, partition=PartitionConfig(
        forget_heads=2, forget_mlp_units=8, max_tp=2, layers=[1]))
    with pytest.raises(PruneError, match="only in layers"):
        pruned_core(partial)
    empty = CoreConfig(model=CORE.model, partition=PartitionConfig(forget_heads=0, forget_mlp_units=0))
    with pytest.raises(PruneError, match="no ablated units"):
        pruned_core(empty)
