"""Worker for the MoE post-training test: a Mixtral-shaped SGTM MoE trained by the real loop on
real bilingual text (English retain, Spanish forget), then ``sgtm ablate`` (experts removed),
``--prune`` and ``--export hf`` run in-process, one command after another."""
from __future__ import annotations

from pathlib import Path

import torch

from _workers_post_cli import _cli, _port

# Every block MoE, no shared expert, softmax over the chosen two: Mixtral's shape.
MIXTRAL = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=8",
    "model.num_query_groups=4", "model.ffn_hidden_size=64", "model.vocab_size=320",
    "model.seq_length=32", "model.activation=swiglu", "model.position_embedding=rope",
    "model.normalization=RMSNorm", "model.add_bias_linear=false", "model.tie_embeddings=false",
    "model.moe={num_experts: 6, top_k: 2, ffn_hidden_size: 32, aux_loss_coeff: 0.01}",
    "partition.forget_heads=2", "partition.forget_mlp_units=0", "partition.forget_experts=2",
    "partition.max_tp=2"]


def _train(tmp: Path, data: Path):
    """20 steps of the real training loop; its checkpoint is what the commands read."""
    from megatron_sgtm.train.config import load_experiment
    from megatron_sgtm.train.loop import train

    cfg = load_experiment(None, MIXTRAL + [
        f"data.dir={data}", "data.method=sgtm", "data.eval_batches=1", "train.steps=20",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=0.01",
        "train.warmup_steps=2", "train.log_every=10", f"checkpoint.dir={tmp / 'ckpt'}",
        "logging.wandb=off", "logging.progress_bar=false", "model.params_dtype=fp32"])
    return train(cfg)


def _held_out(data: Path):
    from megatron_sgtm.post.shards import sequences

    return {split: sequences(data, split, 32, 16) for split in ("test_forget", "test_retain")}


def world_moe_cli(rank, world, tmp):
    import os

    from megatron_sgtm.ablation import zero_forget_
    from megatron_sgtm.data.testing import write_sample_shards
    from megatron_sgtm.parallel import destroy_parallel, init_parallel
    from megatron_sgtm.post import ckpt_io, common

    from _workers_moe import count_assignments

    tmp = Path(tmp)
    data = tmp / "data"
    write_sample_shards(data, n_train=120, n_test=24)
    init_parallel(1, seed=0)
    out = {"trained": _train(tmp, data).step}
    destroy_parallel()
    ckpt = tmp / "ckpt"
    out["ablate"] = _cli("ablate_cli", [ckpt, "--out", tmp / "abl"])
    out["prune"] = _cli("ablate_cli", [ckpt, "--out", tmp / "pruned", "--prune"])
    out["hf"] = _cli("ablate_cli", [ckpt, "--out", tmp / "hf", "--prune", "--export", "hf"])
    out["eval"] = _cli("eval_cli", [tmp / "abl", "--data", data, "--seq", 32, "--batch", 4,
                                    "--calibration-steps", 2, "--max-sequences", 8])
    out["eval_hf"] = _cli("eval_cli", [tmp / "hf", "--data", data, "--seq", 32, "--batch", 4,
                                       "--calibration-steps", 0, "--max-sequences", 8])

    os.environ["MASTER_PORT"] = _port()
    init_parallel(1, seed=0)
    held_out = _held_out(data)
    trained, _core, _meta = ckpt_io.load(ckpt, 1)
    abl, abl_core, abl_meta = ckpt_io.load(tmp / "abl", 1)
    pruned, pruned_core, _ = ckpt_io.load(tmp / "pruned", 1)
    hf_ours, _, _ = ckpt_io.load(tmp / "hf", 1)
    out.update(removed=abl_meta["extra"].get("removed_experts"),
               experts_left=abl_core.model.moe.num_experts,
               pruned_heads=pruned_core.model.num_attention_heads, counts={}, logits={})
    for split, seqs in held_out.items():
        tokens = seqs[:, :-1]
        out["counts"][split] = {"trained": count_assignments(trained.eval(), tokens)}
        with torch.no_grad():
            out["logits"][(split, "abl")] = common.logits(abl.eval(), tokens)
            out["logits"][(split, "pruned")] = common.logits(pruned.eval(), tokens)
            out["logits"][(split, "hf_ours")] = common.logits(hf_ours.eval(), tokens)
        out["counts"][split]["abl"] = count_assignments(abl, tokens)
    zero_forget_(trained)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
    out["hf_type"] = hf.config.model_type
    for split, seqs in held_out.items():
        tokens = seqs[:, :-1]
        out["counts"][split]["ablated_in_memory"] = count_assignments(trained, tokens)
        with torch.no_grad():
            out["logits"][(split, "ablated_in_memory")] = common.logits(trained, tokens)
            out["logits"][(split, "hf")] = hf(tokens).logits
    return out
