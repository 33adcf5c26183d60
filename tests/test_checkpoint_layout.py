"""Checkpoint directory rules on the filesystem alone: which directories count as complete,
what `latest` resolves to, pruning, re-saving a step."""
import json

import pytest

from megatron_sgtm.checkpoint import CheckpointError, latest_checkpoint, read_metadata, resolve
from megatron_sgtm.checkpoint.layout import (FORMAT_VERSION, META_FILE, STATE_DIR, prune,
                                             publish)


def _fake(root, name, step=0, meta=True):
    d = root / name
    (d / STATE_DIR).mkdir(parents=True)
    if meta:
        (d / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step}))
    return d


def test_only_complete_final_directories_count(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _fake(tmp_path, "step_00000002", 2)
    _fake(tmp_path, "step_00000005.tmp-abc", 5)  # finished writing but never renamed
    _fake(tmp_path, "step_00000004", 4, meta=False)  # no metadata
    _fake(tmp_path, "step_7", 7)  # not the naming scheme
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    for bad in ("step_00000005.tmp-abc", "step_00000004", "step_7"):
        with pytest.raises(CheckpointError):
            read_metadata(tmp_path / bad)
    assert read_metadata(tmp_path / "step_00000002")["step"] == 2


def test_latest_pointer_wins_and_falls_back_when_stale(tmp_path):
    _fake(tmp_path, "step_00000001", 1)
    _fake(tmp_path, "step_00000003", 3)
    (tmp_path / "latest").write_text("step_00000001\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    (tmp_path / "latest").write_text("step_00000009\n")  # points at a deleted checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000003"
    assert resolve(tmp_path) == tmp_path / "step_00000003"
    assert resolve(tmp_path / "step_00000001") == tmp_path / "step_00000001"


def test_resolve_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve(tmp_path)
    (tmp_path / "bad").mkdir()
    _fake(tmp_path / "bad", "step_00000001", 1)
    (tmp_path / "bad" / "step_00000001" / META_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_metadata(tmp_path / "bad" / "step_00000001")


def test_publish_prune_keep_last_and_resave(tmp_path):
    for step in (1, 2, 3):
        tmp = _fake(tmp_path, f"step_{step:08d}.tmp-n{step}", step)
        final = publish(tmp, tmp_path, step)
        prune(tmp_path, 2, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002",
                                                          "step_00000003"]
    # An interrupted save's leftovers go once a later save completes.
    _fake(tmp_path, "step_00000004.tmp-crashed", 4)
    tmp = _fake(tmp_path, "step_00000003.tmp-again", 3)
    (tmp / STATE_DIR / "marker").write_text("new")
    final = publish(tmp, tmp_path, 3)  # re-saving a step replaces it whole
    prune(tmp_path, 2, final)
    assert (final / STATE_DIR / "marker").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002",
                                                          "step_00000003"]
    prune(tmp_path, None, final)  # keep everything
    assert (tmp_path / "step_00000002").exists()
    prune(tmp_path, 1, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]


def test_config_check_compares_model_keys_in_either_nesting():
    from megatron_sgtm.checkpoint import check_compatible

    model = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
             "num_query_groups": None, "kv_channels": None, "activation": "gelu",
             "dropout": 0.0}
    meta = {"config": {"core": {"model": model}}, "partition": {}, "model_shapes": {}}
    explicit = dict(model, num_query_groups=8, kv_channels=8, dropout=0.1)  # same model
    check_compatible(meta, {}, {}, {"model": explicit})
    with pytest.raises(CheckpointError) as err:
        check_compatible(meta, {}, {}, {"model": dict(model, activation="relu", num_layers=3)})
    assert "model 'activation'" in str(err.value) and "model 'num_layers'" in str(err.value)
    assert "dropout" not in str(err.value)
