"""Distributed workers for the checkpoint tests (module level so spawn can import them)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

VOCAB, SEQ = 256, 32


def core_config(tp: int, forget_heads: int = 2, ffn: int = 128):
    from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig

    return CoreConfig(model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8,
                                        ffn_hidden_size=ffn, vocab_size=VOCAB, seq_length=SEQ),
                      partition=PartitionConfig(forget_heads=forget_heads, forget_mlp_units=16),
                      tensor_parallel=tp)


def build(tp: int, seed: int, forget_heads: int = 2, ffn: int = 128):
    from megatron_sgtm.configbase import config_to_dict
    from megatron_sgtm.model import build_model

    torch.manual_seed(seed)
    core = core_config(tp, forget_heads, ffn)
    model = build_model(core)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    return model, opt, config_to_dict(core), model.partition.to_metadata()


def train_step(model, opt, step: int) -> None:
    """One AdamW step on fixed pseudo-random tokens (the same on every rank)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
    pos = torch.arange(SEQ).expand(2, SEQ)
    opt.zero_grad()
    model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean().backward()
    opt.step()


def snapshot(model, opt) -> dict:
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"opt/{names[id(p)]}/{k}"] = v.detach().clone()
    return out


def gathered(model, opt=None) -> dict:
    """Full (TP-gathered) model tensors, and with ``opt`` its per-parameter state tensors, in
    the global layout dist_checkpointing stores."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_sgtm.checkpoint import optim

    out = {}
    tp = ps.get_tensor_model_parallel_world_size()
    tensors = list(nested_values(model.sharded_state_dict()))
    if opt is not None:
        tensors += list(optim.torch_state_for_save(opt, model.sharded_state_dict())["sharded"]
                        .values())
    for t in tensors:
        if not isinstance(t, ShardedTensor):
            continue
        full = torch.zeros(t.global_shape, dtype=t.data.dtype)
        local = (1,) * t.prepend_axis_num + tuple(t.local_shape)
        index = tuple(slice(off, off + size) for off, size in zip(t.global_offset, local))
        replica = t.replica_id if isinstance(t.replica_id, tuple) else (t.replica_id,)
        # Tensors replicated across TP ranks are counted once (from TP rank 0).
        if len(replica) < 2 or replica[1] == 0:
            full[index] = t.data.detach().reshape(local)
        if tp > 1:
            dist.all_reduce(full, group=ps.get_tensor_model_parallel_group())
        out[t.key] = full
    return out


def refused_load(root, model, opt, config, partition):
    """(error message or None, whether model and optimizer stayed untouched) of a load."""
    from megatron_sgtm.checkpoint import CheckpointError, load_checkpoint

    before = snapshot(model, opt)
    try:
        load_checkpoint(root, model, opt, config, partition)
        message = None
    except CheckpointError as exc:
        message = str(exc)
    after = snapshot(model, opt)
    return message, all(torch.equal(v, after[k]) for k, v in before.items())


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def save_load_roundtrip(rank, world, tp, root):
    """Train, save three times (keep 2), reload into a fresh model, compare bitwise; then
    continue one step from both and compare again; then the failure modes."""
    from megatron_sgtm.checkpoint import (latest_checkpoint, load_checkpoint,
                                          read_metadata, restore_rng_state, save_checkpoint)
    from megatron_sgtm.parallel import init_parallel

    init_parallel(tp, 7)
    root = Path(root)
    model, opt, config, part = build(tp, seed=1)
    for step in (1, 2, 3):
        train_step(model, opt, step)
        save_checkpoint(root, step, model, opt, {"step": step, "rank_note": f"r{rank}s{step}"},
                        config, part, keep_last=2)
    saved = snapshot(model, opt)
    full = gathered(model, opt)
    expected_draw = torch.rand(3)  # the RNG right after the save: restoring must replay it

    fresh, fresh_opt, _, _ = build(tp, seed=2)
    assert not torch.equal(next(fresh.parameters()), next(model.parameters()))
    extra = load_checkpoint(root, fresh, fresh_opt, config, part)
    loaded = snapshot(fresh, fresh_opt)
    restore_rng_state(extra["rng_state"])
    after_restore = torch.rand(3)

    train_step(model, opt, 4)
    train_step(fresh, fresh_opt, 4)
    continued = (snapshot(model, opt), snapshot(fresh, fresh_opt))

    # An interrupted save: a .tmp- directory with partial content is never picked up.
    dead = root / "step_00000004.tmp-deadbeef"
    if rank == 0:
        (dead / "state").mkdir(parents=True)
        (dead / "state" / "half.distcp").write_bytes(b"\0" * 10)
    torch.distributed.barrier()
    latest = latest_checkpoint(root)

    # Another partition (or model shape): refused before touching the model; files untouched.
    before = tree_hash(root / "step_00000003")
    other, other_opt, other_cfg, other_part = build(tp, seed=3, forget_heads=4)
    mismatch, untouched = refused_load(root, other, other_opt, other_cfg, other_part)
    wide, wide_opt, wide_cfg, wide_part = build(tp, seed=3, ffn=256)
    shape_mismatch, _ = refused_load(root, wide, wide_opt, wide_cfg, wide_part)
    after = tree_hash(root / "step_00000003")
    torch.distributed.barrier()
    return {"saved": saved, "loaded": loaded, "continued": continued, "extra": extra,
            "rng_equal": torch.equal(expected_draw, after_restore),
            "latest": str(latest), "dirs": sorted(p.name for p in root.iterdir()),
            "meta": read_metadata(root / "step_00000003"), "mismatch": mismatch, "shape_mismatch": shape_mismatch,
            "untouched": untouched, "files_same": before == after, "full": full}


def reshard_then_roundtrip(rank, world, tp, other_root, root):
    """Load a checkpoint written at another TP size (full tensors must match), then run the
    whole save/load roundtrip at this size."""
    from megatron_sgtm.checkpoint import load_checkpoint
    from megatron_sgtm.parallel import init_parallel

    init_parallel(tp, 7)
    model, opt, config, part = build(tp, seed=5)
    extra = load_checkpoint(other_root, model, opt, config, part)
    resharded = {"full": gathered(model, opt), "extra": extra}
    return {"resharded": resharded, **save_load_roundtrip(rank, world, tp, root)}


def single_process(rank, world, root):
    """World size 1 (as the post tools run): roundtrip, the stored metadata, and a config
    whose model keys differ while every tensor shape agrees (refused, model untouched)."""
    import copy

    from megatron_sgtm.checkpoint import load_checkpoint, read_metadata
    from megatron_sgtm.checkpoint import save_checkpoint
    from megatron_sgtm.parallel import init_parallel

    init_parallel(1, 7)
    root = Path(root)
    model, opt, config, part = build(1, seed=1)
    for step in (1, 2):
        train_step(model, opt, step)
    save_checkpoint(root, 2, model, opt, {"step": 2, "rank_note": "r0s2"}, config, part, None)
    fresh, fresh_opt, _, _ = build(1, seed=2)
    extra = load_checkpoint(root, fresh, fresh_opt, {"core": config}, part)  # nested form too

    before = tree_hash(root)
    changed = copy.deepcopy(config)
    changed["model"]["tie_embeddings"] = not changed["model"]["tie_embeddings"]
    other, other_opt, _, _ = build(1, seed=3)
    config_mismatch, untouched = refused_load(root, other, other_opt, changed, part)
    return {"saved": snapshot(model, opt), "loaded": snapshot(fresh, fresh_opt), "extra": extra,
            "meta": read_metadata(root / "step_00000002"), "config_mismatch": config_mismatch,
            "untouched": untouched, "files_same": before == tree_hash(root),
            "full": gathered(model, opt)}
