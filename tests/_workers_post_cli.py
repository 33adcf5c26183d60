"""Worker for the post-training CLI test: real checkpoints written by megatron_sgtm.checkpoint,
commands run in-process one after another (each sets up and tears down its process group)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import shutil
from pathlib import Path

import numpy as np
import torch


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _cli(module, argv):
    """(exit code, stderr) of one command in this process."""
    import importlib

    os.environ["MASTER_PORT"] = _port()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = importlib.import_module(f"megatron_sgtm.post.{module}").main([str(a) for a in argv])
    return code, err.getvalue()


def world_cli(rank, world, tmp):
    from megatron_sgtm import checkpoint as ck
    from megatron_sgtm.configbase import config_to_dict
    from megatron_sgtm.data.testing import write_test_shards
    from megatron_sgtm.parallel import destroy_parallel, init_parallel
    from megatron_sgtm.post import ckpt_io, common
    from megatron_sgtm.post.ablate import max_abs_forget

    from _workers_post import build, core_config

    tmp = Path(tmp)
    data = tmp / "data"
    gen = np.random.default_rng(0)
    docs = lambda n: [gen.integers(5, 96, 30).tolist() + [1] for _ in range(n)]  # noqa: E731
    write_test_shards(data, docs(20), [0] * 10 + [2] * 10, [0] * 10 + [1] * 10, vocab=96)
    write_test_shards(data, docs(6), [2] * 6, [1] * 6, vocab=96, split="test_forget")
    write_test_shards(data, docs(6), [1] * 6, [0] * 6, vocab=96, split="test_retain")
    write_test_shards(tmp / "empty", [], [], [], vocab=96, split="test_forget")

    init_parallel(1, seed=0)
    model, _ = build("mha_gelu", 1)
    core = core_config("mha_gelu", 1)
    part = model.partition.to_metadata()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with common.retain_mode(tokens), torch.no_grad():
        retain_logits = common.logits(model, tokens)
    config = config_to_dict(core)
    ck.save_checkpoint(tmp / "ckpt", 7, model, None, {"manifest": {"tokenizer_sha256": None}},
                       config, part)
    destroy_parallel()
    out = {"retain_logits": retain_logits}
    out["ckpt_version"] = json.loads(
        (ck.latest_checkpoint(tmp / "ckpt") / "sgtm_meta.json").read_text()).get("sgtm_version")

    out["ablate"] = _cli("ablate_cli", [tmp / "ckpt", "--out", tmp / "abl"])
    out["prune"] = _cli("ablate_cli", [tmp / "ckpt", "--out", tmp / "pruned", "--prune"])
    out["hf"] = _cli("ablate_cli", [tmp / "ckpt", "--out", tmp / "hf", "--export", "hf"])
    out["ablated_version"] = json.loads(
        (ck.latest_checkpoint(tmp / "abl") / "sgtm_meta.json").read_text()).get("sgtm_version")
    out["exists"] = _cli("ablate_cli", [tmp / "ckpt", "--out", tmp / "abl"])
    out["eval"] = _cli("eval_cli", [tmp / "abl", "--data", data, "--seq", 12, "--batch", 2,
                                    "--calibration-steps", 5, "--out", tmp / "eval.jsonl"])
    out["eval_rows"] = [json.loads(l) for l in (tmp / "eval.jsonl").read_text().splitlines()]
    out["attack"] = _cli("attack_cli", [tmp / "abl", "--data", data, "--seq", 12, "--batch", 4,
                                        "--target-loss", 1.0, "--lr", 1e-2, "--warmup", 2,
                                        "--cosine-steps", 10, "--max-steps", 10,
                                        "--eval-every", 5, "--out", tmp / "attack.jsonl"])
    out["attack_rows"] = [json.loads(l) for l in (tmp / "attack.jsonl").read_text().splitlines()]
    out["rmu"] = _cli("rmu_cli", [tmp / "ckpt", "--data", data, "--out", tmp / "rmu", "--seq", 12,
                                  "--layer", 1, "--steps", 3, "--lr", 1e-3])
    out["rmu_eval"] = _cli("eval_cli", [tmp / "rmu", "--data", data, "--seq", 12,
                                        "--calibration-steps", 0])
    out["empty"] = _cli("eval_cli", [tmp / "abl", "--data", tmp / "empty", "--seq", 12])

    # A checkpoint without partition metadata.
    shutil.copytree(tmp / "ckpt", tmp / "nopart")
    meta_path = ck.latest_checkpoint(tmp / "nopart") / "sgtm_meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("partition")
    meta_path.write_text(json.dumps(meta))
    out["nopart"] = _cli("ablate_cli", [tmp / "nopart", "--out", tmp / "x"])
    # A checkpoint trained on data with another tokenizer.
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "f" * 64
    (tmp / "otherdata").mkdir()
    for f in data.iterdir():
        shutil.copy(f, tmp / "otherdata" / f.name)
    (tmp / "otherdata" / "manifest.json").write_text(json.dumps(manifest))
    os.environ["MASTER_PORT"] = _port()
    init_parallel(1, seed=0)
    m2, _ = build("mha_gelu", 1)
    ck.save_checkpoint(tmp / "tok", 7, m2, None, {"manifest": {"tokenizer_sha256": "e" * 64}},
                       config, part)
    destroy_parallel()
    out["tokenizer"] = _cli("eval_cli", [tmp / "tok", "--data", tmp / "otherdata", "--seq", 12])

    os.environ["MASTER_PORT"] = _port()
    init_parallel(1, seed=0)
    abl, _, _ = ckpt_io.load(tmp / "abl", 1)
    pruned, pcore, _ = ckpt_io.load(tmp / "pruned", 1)
    with torch.no_grad():
        out["abl_logits"] = common.logits(abl, tokens)
        out["abl_forget_max"] = max_abs_forget(abl)
        out["pruned_logits"] = common.logits(pruned, tokens)
        out["pruned_heads"] = pcore.model.num_attention_heads
        from transformers import AutoModelForCausalLM

        out["hf_logits"] = AutoModelForCausalLM.from_pretrained(tmp / "hf")(tokens).logits
    return out
