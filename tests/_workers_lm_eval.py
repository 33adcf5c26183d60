"""Worker of the lm-eval test: demo-scale models trained by `python -m megatron_sgtm.train`,
then `sgtm eval --lm-eval` on them and the cross-checks against our own model."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# The demo's model and budget (megatron_sgtm/demo.py, "standard"): d64, 2 layers, 4 heads,
# ffn 256, one forget head and 32 forget MLP units, 480 steps of 16 x 64 tokens.
DEMO_SCALE = ["model.num_attention_heads=4", "model.ffn_hidden_size=256",
              "partition.forget_heads=1", "partition.forget_mlp_units=32",
              "train.micro_batch_size=16", "train.global_batch_size=16", "train.steps=480",
              "train.warmup_steps=24", "train.lr=3e-3", "train.log_every=480", "train.eval_every=0",
              "checkpoint.save_every=0", "logging.wandb=off", "logging.progress_bar=false",
              "data.eval_batches=0"]
LIMIT = 200  # items per task in the lm-eval runs (every multiple-choice block of the forget split)


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_both(tmp: Path, data: Path) -> dict[str, Path]:
    """No-filter and SGTM at the demo's scale, side by side, through the torchrun entry."""
    procs = {}
    for name, method in (("no_filter", "none"), ("sgtm", "sgtm")):
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=_port(), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "megatron_sgtm.train", "--config",
               str(ROOT / "configs/train/tiny_cpu.yaml"), f"data.dir={data}",
               f"data.method={method}", f"checkpoint.dir={tmp / name}", *DEMO_SCALE]
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    for name, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    return {name: tmp / name for name in procs}


def _cli(argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one `sgtm` command in this process."""
    from megatron_sgtm.cli import main

    os.environ["MASTER_PORT"] = _port()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _our_loglikelihood(model, sp, context: str, continuation: str, max_length: int) -> float:
    """lm-eval's request, scored by our megatron model on sentencepiece ids (lm-eval's
    convention: continuation = encode(context + continuation) past encode(context))."""
    from megatron_sgtm.post import common

    whole = sp.encode(context + continuation)
    cont = whole[len(sp.encode(context)):]
    window = whole[-(max_length + 1):]
    tokens = torch.tensor([window[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(common.full_logits(common.logits(model, tokens)).float(), -1)[0]
    targets = torch.tensor(window[1:])
    return float(logp[-len(cont):].gather(1, targets[-len(cont):, None]).sum())


def _checks(step_dir: Path, hf_dir: Path, ablate: bool, data: Path, samples: Path) -> dict:
    """HF logits vs ours on real held-out sequences; lm-eval's log-likelihoods vs ours."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sgtm.parallel import destroy_parallel, init_parallel
    from megatron_sgtm.post import ckpt_io, common, shards
    from megatron_sgtm.post.ablate import zero_forget_

    os.environ["MASTER_PORT"] = _port()
    init_parallel(1, seed=0)
    try:
        model, core, _ = ckpt_io.load(step_dir, 1)
        if ablate:
            zero_forget_(model)
        model.eval()
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
        seq = core.model.seq_length
        tokens = torch.cat([shards.sequences(data, s, seq - 1, 4)[:, :-1]
                            for s in ("test_forget", "test_retain")])
        with torch.no_grad():
            ours = common.full_logits(common.logits(model, tokens))
            theirs = hf(tokens).logits
        sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        mc = [json.loads(l) for l in samples.read_text().splitlines()]
        mc = [s for s in mc if s["task"] == "sgtm_forget_mc"][:40]
        pairs = [(s["resps"][k][0][0], _our_loglikelihood(model, sp, *s["arguments"][k], seq))
                 for s in mc for k in range(len(s["arguments"]))]
        return {"logit_diff": float((ours - theirs).abs().max()),
                "logit_scale": float(ours.abs().max()),
                "ll_diff": max(abs(a - b) for a, b in pairs), "ll_pairs": len(pairs),
                "eos": (hf.config.eos_token_id, hf.config.pad_token_id, tok.eos_token_id,
                        tok.pad_token_id)}
    finally:
        destroy_parallel()


def world_lm_eval(rank, world, tmp, data, runs):
    tmp, data = Path(tmp), Path(data)
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf_datasets_cache")  # not the user's cache
    runs = {k: Path(v) for k, v in runs.items()}
    out = {"tasks": _cli(["eval-tasks", "--data", data, "--out", tmp / "tasks"])}
    common_args = ["--tasks-dir", tmp / "tasks", "--limit", LIMIT, "--log-samples"]
    for name, ckpt in runs.items():
        res = tmp / f"eval_{name}.jsonl"
        out[name] = {"cli": _cli(["eval", ckpt, "--lm-eval", "sgtm", "--out", res, *common_args])}
        results = json.loads(res.with_name(res.stem + ".lm_eval.json").read_text())
        step = Path(results["sgtm"]["checkpoint"])
        out[name].update(
            results=results["results"], n=results["n-samples"], provenance=results["sgtm"],
            rows=[json.loads(l) for l in res.read_text().splitlines()],
            **_checks(step, Path(results["sgtm"]["export"]), name == "sgtm", data,
                      res.with_name(res.stem + ".lm_eval_samples.jsonl")))
    # A second run reuses the export it made ...
    export = Path(out["sgtm"]["provenance"]["export"])
    stamp = (export / "model.safetensors").stat().st_mtime_ns
    # ... also when our own losses run in the same call (one JSON-lines file for both).
    out["again"] = _cli(["eval", runs["sgtm"], "--data", data, "--calibration-steps", 0,
                         "--max-sequences", 8, "--lm-eval", "sgtm_forget_mc", "--limit", 8,
                         "--tasks-dir", tmp / "tasks", "--out", tmp / "again.jsonl"])
    out["again_rows"] = [json.loads(l) for l in (tmp / "again.jsonl").read_text().splitlines()]
    out["again_unchanged"] = (export / "model.safetensors").stat().st_mtime_ns == stamp
    # The export directory itself is a model lm-eval can be pointed at.
    out["given"] = _cli(["eval", export, "--lm-eval", "sgtm_retain_mc", "--limit", 8,
                         "--tasks-dir", tmp / "tasks"])

    # Bad input: an unknown task; a checkpoint whose tokenizer is gone; a hub task offline.
    out["unknown"] = _cli(["eval", runs["sgtm"], "--lm-eval", "sgtm_forget_mcq",
                           "--tasks-dir", tmp / "tasks"])
    notok = tmp / "notok"
    shutil.copytree(runs["no_filter"], notok)
    (meta_path,) = notok.glob("step_*/sgtm_meta.json")
    meta = json.loads(meta_path.read_text())
    meta["config"]["data"]["dir"] = str(tmp / "deleted_prep_output")
    meta_path.write_text(json.dumps(meta))
    out["notok"] = _cli(["eval", notok, "--lm-eval", "sgtm_forget_mc", "--tasks-dir", tmp / "tasks"])
    # A relative data.dir is found from an ancestor of the checkpoint (where training ran).
    from megatron_sgtm import checkpoint as ck
    from megatron_sgtm.post.eval_export import find_tokenizer

    (tmp / "elsewhere" / "runs").mkdir(parents=True)
    (tmp / "elsewhere" / "runs" / "shards").symlink_to(data)
    shutil.copytree(runs["no_filter"], tmp / "elsewhere" / "runs" / "ckpt")
    (rel_meta,) = (tmp / "elsewhere" / "runs" / "ckpt").glob("step_*/sgtm_meta.json")
    meta = json.loads(rel_meta.read_text())
    meta["config"]["data"]["dir"] = "runs/shards"
    rel_meta.write_text(json.dumps(meta))
    found = find_tokenizer(ck.read_metadata(rel_meta.parent), None, rel_meta.parent, True)
    out["relative_tokenizer"] = str(found.resolve()) == str((data / "tokenizer.model").resolve())
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # (With the local tasks too: the same lm-eval index as the unknown-name call, built once.)
    out["hub"] = _cli(["eval", runs["sgtm"], "--lm-eval", "wmdp_bio", "--limit", 8,
                       "--tasks-dir", tmp / "tasks"])
    return out


def world_llama_pruned(rank, world, tmp, data):
    """A Llama-style (rope, SwiGLU, RMSNorm) SGTM checkpoint, ablated, pruned and exported
    with its tokenizer: AutoTokenizer ids and AutoModelForCausalLM logits equal ours."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sgtm import checkpoint as ck
    from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig
    from megatron_sgtm.configbase import config_to_dict
    from megatron_sgtm.model import build_model
    from megatron_sgtm.parallel import destroy_parallel, init_parallel
    from megatron_sgtm.post import ckpt_io, common, shards
    from megatron_sgtm.post.ablate import prune_full_params, zero_forget_
    from megatron_sgtm.post.layout import gather_full_params, load_full_params

    tmp, data = Path(tmp), Path(data)
    core = CoreConfig(
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                          ffn_hidden_size=128, vocab_size=2048, seq_length=32, activation="swiglu",
                          position_embedding="rope", normalization="RMSNorm", tie_embeddings=False),
        partition=PartitionConfig(forget_heads=2, forget_mlp_units=16, max_tp=2),
        routing=RoutingConfig(method="sgtm", variant="joint_attention"), tensor_parallel=1)
    init_parallel(1, seed=0)
    torch.manual_seed(0)
    model = build_model(core)
    config = dict(config_to_dict(core), data={"dir": str(data)})
    sha = ckpt_io._find_sha({"m": json.loads((data / "manifest.json").read_text())})
    ck.save_checkpoint(tmp / "llama", 1, model, None, {"manifest": {"tokenizer_sha256": sha}},
                       config, model.partition.to_metadata())
    zero_forget_(model)
    new_core, pruned = prune_full_params(gather_full_params(model), core)
    small = build_model(new_core)
    load_full_params(small, pruned)
    tokens = shards.sequences(data, "test_forget", 31, 4)[:, :-1]
    with torch.no_grad():
        ours = common.full_logits(common.logits(small, tokens))
    destroy_parallel()
    code, _, err = _cli(["ablate", tmp / "llama", "--out", tmp / "llama_hf", "--prune",
                         "--export", "hf"])
    assert code == 0, err
    hf = AutoModelForCausalLM.from_pretrained(str(tmp / "llama_hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp / "llama_hf"))
    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
    texts = [sp.decode(row.tolist()) for row in tokens]
    with torch.no_grad():
        theirs = hf(tokens).logits
    return {"arch": type(hf).__name__, "ffn": hf.config.intermediate_size,
            "logit_diff": float((ours - theirs).abs().max()),
            "ids_equal": all(tok(t)["input_ids"] == sp.encode(t) for t in texts),
            "eos_pad": (hf.config.eos_token_id, hf.config.pad_token_id)}
