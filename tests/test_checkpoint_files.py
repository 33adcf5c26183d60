"""The pieces of a safe checkpoint load, without a process group: sha256 records, the
pickle-free per-rank file, and the restricted unpicklers (see test_checkpoint_security.py
for the same on real trained checkpoints and every command)."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from megatron_sgtm.checkpoint import integrity, rank_state, vetting
from megatron_sgtm.checkpoint.layout import CheckpointError


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ---------------------------------------------------------------- integrity


def test_shares_cover_every_file_once_and_balance_bytes():
    sizes = {f"f{i}": size for i, size in enumerate([100, 90, 10, 10, 10, 5, 0, 3])}
    for world in (1, 2, 3, 8, 12):
        parts = integrity.shares(sizes, world)
        assert len(parts) == world
        assert sorted(n for part in parts for n in part) == sorted(sizes)
        assert parts == integrity.shares(dict(reversed(sizes.items())), world)  # deterministic
    loads = [sum(sizes[n] for n in part) for part in integrity.shares(sizes, 2)]
    assert sorted(loads) == [113, 115]  # largest first, each to the lighter rank


def test_streamed_sha256_equals_hashlib_across_chunks(tmp_path, monkeypatch):
    data = os.urandom(100_003)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 4096)
    assert integrity.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_listing_and_digest_problems_name_each_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a", "sub/b", "c"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    recorded = integrity.digests(tmp_path, integrity.list_files(tmp_path))
    assert integrity.listing_problems(recorded, integrity.list_files(tmp_path)) == []
    assert integrity.digest_problems(tmp_path, recorded, recorded) == []

    (tmp_path / "a").write_bytes(b"A" * 10)              # same size, other bytes
    (tmp_path / "c").unlink()
    (tmp_path / "new").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "sub" / "b")
    (tmp_path / "linked_dir").symlink_to(tmp_path / "sub")
    listing = integrity.listing_problems(recorded, integrity.list_files(tmp_path))
    assert [p.split(":")[0] for p in listing] == ["c", "link", "linked_dir", "new"]
    assert "missing" in listing[0] and "not recorded" in listing[2]
    (digest,) = integrity.digest_problems(tmp_path, recorded, ["a", "sub/b"])
    assert digest.startswith("a: sha256")
    message = integrity.summary(listing + [digest], tmp_path)
    assert message.startswith(f"{tmp_path}: integrity check failed: c: missing")
    assert "and 4 more" in message and "left as it is" in message


# ---------------------------------------------------------------- per-rank file


def _rng() -> dict:
    random.seed(3)
    random.random()
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.seed(4)
    np.random.standard_normal()
    torch.manual_seed(5)
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "tracker": {"model-parallel-rng": torch.get_rng_state()}}


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
            np.random.randint(0, 1 << 30), torch.rand(3).tolist())


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling on a path that must not unpickle")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                        (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(owner, name, refuse)


def test_rank_state_round_trips_exactly_without_pickle(tmp_path, no_unpickling):
    rng = _rng()
    expected = _draws()
    extra = {"step": 7, "loss": 0.1 + 0.2, "note": None, "flags": [True, False],
             "pair": (1, "two"), "nested": {"t": torch.arange(6).view(2, 3).double(),
                                            "a": np.arange(4, dtype=np.int16),
                                            "scalar": np.float32(0.5)}}
    path = tmp_path / "rank_00000.safetensors"
    rank_state.write(path, extra, rng)
    assert path.read_bytes()[:2] != b"PK" and path.read_bytes()[0] != 0x80  # not zip, not pickle
    saved = rank_state.read(path)
    got = saved["extra"]
    assert got["step"] == 7 and got["loss"] == 0.1 + 0.2 and got["note"] is None
    assert got["flags"] == [True, False] and got["pair"] == (1, "two")
    assert torch.equal(got["nested"]["t"], extra["nested"]["t"])
    assert got["nested"]["a"].dtype == np.int16 and got["nested"]["a"].tolist() == [0, 1, 2, 3]
    assert got["nested"]["scalar"] == 0.5
    assert rank_state.read_extra(path)["pair"] == (1, "two")

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = saved["rng"]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    assert _draws() == expected
    assert torch.equal(state["tracker"]["model-parallel-rng"], rng["tracker"]["model-parallel-rng"])


@pytest.mark.parametrize("extra,where", [
    ({"obj": object()}, "extra['obj']"),
    ({"s": {1, 2}}, "extra['s']"),
    ({"d": {3: "x"}}, "extra['d']: key 3"),
    ({"__tensor__": 1}, "extra: key '__tensor__'"),
])
def test_rank_state_refuses_what_it_cannot_store(tmp_path, extra, where):
    with pytest.raises(CheckpointError, match=f"^{where}".replace("[", r"\[").replace("]", r"\]")):
        rank_state.write(tmp_path / "r.safetensors", extra, _rng())


def test_rank_state_reads_no_pickle_even_when_one_is_planted(tmp_path, no_unpickling):
    path = tmp_path / "rank_00000.safetensors"
    with open(path, "wb") as f:
        pickle.dump(Payload(tmp_path / "ran"), f)
    with pytest.raises(CheckpointError, match="not a per-rank state file of this project"):
        rank_state.read(path)
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------- vetting


def _dcp_metadata():
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                       TensorProperties, TensorStorageMetadata)

    chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([4]))
    return Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        TensorProperties(dtype=torch.bfloat16), torch.Size([4]), [chunk])})


def test_dcp_metadata_passes_and_a_payload_in_it_is_refused_unrun(tmp_path):
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(_dcp_metadata()))
    loaded = vetting.read_dcp_metadata(path)
    assert loaded.state_dict_metadata["w"].properties.dtype == torch.bfloat16

    tampered = _dcp_metadata()
    tampered.extra = Payload(tmp_path / "ran")
    path.write_bytes(pickle.dumps(tampered))
    with pytest.raises(vetting.UnsafeCheckpoint, match="posix.system.*--trust-checkpoint"):
        vetting.read_dcp_metadata(path)
    assert not (tmp_path / "ran").exists()


def test_torch_files_pass_with_tensors_and_refuse_payloads_unrun(tmp_path):
    good = io.BytesIO()
    torch.save({"w": torch.ones(2), "groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]}, good)
    vetting.vet_torch_bytes(good.getvalue(), tmp_path / "x", "a test file")
    torch.save({"w": torch.ones(2), "p": Payload(tmp_path / "ran")}, tmp_path / "bad.pt")
    with pytest.raises(vetting.UnsafeCheckpoint, match="bad.pt: a test file holds a pickled "
                                                      "reference to posix.system"):
        vetting.vet_torch_bytes(tmp_path / "bad.pt", tmp_path / "bad.pt", "a test file")
    assert not (tmp_path / "ran").exists()
    with pytest.raises(vetting.UnsafeCheckpoint,
                       match=r"y: a test file cannot be read by the restricted unpickler"):
        vetting.vet_torch_bytes(b"garbage", tmp_path / "y", "a test file")
