"""One-call GPU benchmark: tokens/s, MFU and peak memory at the paper's shapes and micro-batch.

For each shape it times, in the same process:
  - SGTM on: the `sgtm train` step itself (megatron-core GPTModel with SGTM linears, megatron
    DDP and optimizer, bf16 params with fp32 main grads, fused AdamW, torch.compile), on a
    micro-batch mixing forget, retain-path and unlabelled sequences;
  - masking off: the same step with routing method 'none';
  - reference: a plain SDPA GPT built here (same width, depth, vocab, tied embeddings) with
    bf16 autocast, fp32 params, fused AdamW and torch.compile.
If the trainer's step fails, a plain-loop row of the same model follows the error row. Each row
also counts host-device synchronisations per step (CUDA sync debug mode). It prints a short
table last; JSON goes to $OUT/gpu_bench.json (or --json).

    python bench/gpu.py                      # 64M and 254M, paper micro-batches (GPU)
    python bench/gpu.py --tiny --device cpu --no-compile --steps 2   # CPU smoke check
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# Runnable from a plain checkout (a GPU machine with torch and megatron-core but without this
# package installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # SGTM.md section 8: layers, hidden, ffn, heads, context, micro-batch
    "64M": dict(layers=12, hidden=512, ffn=2048, heads=32, seq=512, batch=32),
    "254M": dict(layers=16, hidden=1024, ffn=4096, heads=32, seq=1024, batch=16),
    "tiny": dict(layers=2, hidden=64, ffn=256, heads=4, seq=32, batch=4),
}
VOCAB = 50304  # GPT-Neo's 50257, padded to a multiple of 128
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def reference_gpt(shape, vocab):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, d, heads, ffn):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

        def forward(self, x):
            b, s, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            d = shape["hidden"]
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(shape["seq"], d)
            self.blocks = nn.ModuleList(Block(d, shape["heads"], shape["ffn"])
                                        for _ in range(shape["layers"]))
            self.ln_f = nn.LayerNorm(d)

        def forward(self, tokens, targets):
            pos = torch.arange(tokens.shape[1], device=tokens.device)
            x = self.wte(tokens) + self.wpe(pos)
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.t()
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    model = GPT()
    for name, p in model.named_parameters():  # GPT-2 style init, like megatron's init_std
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    return model


def experiment(shape, vocab, method: str, args):
    """The training config `sgtm train` would run for this shape (defaults: bf16 params with
    CUDA, compile on with CUDA), built in memory; the data directory is never read."""
    from megatron_sgtm.config import ModelConfig, PartitionConfig, RoutingConfig
    from megatron_sgtm.train.config import ROUTING_OF, DataConfig, ExperimentConfig, TrainConfig

    return ExperimentConfig(
        model=ModelConfig(num_layers=shape["layers"], hidden_size=shape["hidden"],
                          num_attention_heads=shape["heads"], ffn_hidden_size=shape["ffn"],
                          vocab_size=vocab, seq_length=shape["seq"]),
        partition=PartitionConfig(forget_heads=1, forget_mlp_units=min(64, shape["ffn"] // 4),
                                  placement="last"),
        routing=RoutingConfig(method=ROUTING_OF[method]),
        data=DataConfig(dir="(synthetic batches)", method=method),
        train=TrainConfig(micro_batch_size=shape["batch"], global_batch_size=shape["batch"],
                          compile=args.compile, compile_mode=args.compile_mode))


# Per micro-batch (forget, retain-path) fractions of the sequences; the rest are unlabelled.
# Label counts change from step to step in real training, so the timed steps cycle through
# three mixes (about the paper's bilingual mix, a forget-light one, one with no forget tokens).
LABEL_MIXES = ((1 / 4, 1 / 10), (1 / 8, 0.0), (0.0, 1 / 4))


def synthetic_batches(shape, vocab) -> list[dict]:
    """Loader batches (host tensors, label-homogeneous sequences) for each mix."""
    import torch

    b, s = shape["batch"], shape["seq"]
    out = []
    for forget, retain in LABEL_MIXES:
        tokens = torch.randint(0, vocab, (b, s + 1))
        n_forget = round(b * forget)
        n_retain = min(b - n_forget, round(b * retain))
        per_seq = torch.tensor([2] * n_forget + [1] * n_retain + [0] * (b - n_forget - n_retain))
        labels = per_seq.unsqueeze(1).expand(b, s).contiguous()
        out.append({"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
                    "routing_labels": labels, "applied_label": labels, "true_domain": labels})
    return out


def _method(variant: str) -> str:
    """"SGTM on" and "SGTM on (plain loop)" route with SGTM; the others route nothing."""
    return "sgtm" if variant.startswith("SGTM on") else "none"


def engine_step(name, shape, vocab, args, device):
    """One `sgtm train` optimizer step: model, compile, engine and step code of the trainer."""
    from megatron_sgtm.model import build_model
    from megatron_sgtm.train.batches import InputBuilder
    from megatron_sgtm.train.engine import build_engine
    from megatron_sgtm.train.fastpath import compile_model
    from megatron_sgtm.train.loop import accumulate_grads

    cfg = experiment(shape, vocab, _method(name), args)
    model = build_model(cfg.core)
    compile_model(model, cfg.train, device)
    engine = build_engine(model, cfg)
    builder = InputBuilder(cfg, device)
    batches = itertools.cycle(synthetic_batches(shape, vocab))
    model.train()

    def step():
        loss = accumulate_grads(engine, builder, [next(batches)], device)
        engine.step(cfg.train.lr)
        return loss

    return model, step


def plain_step(name, shape, vocab, args, device):
    """The reference GPT (or, as a fallback, our model) in a hand-written step: bf16 autocast,
    fp32 params, fused AdamW."""
    import torch

    from megatron_sgtm.config import CoreConfig
    from megatron_sgtm.model import build_model
    from megatron_sgtm.routing import route

    if name == "reference":
        model = reference_gpt(shape, vocab).to(device)
    else:
        cfg = experiment(shape, vocab, _method(name), args)
        cfg.model.params_dtype = "fp32"
        model = build_model(CoreConfig(cfg.model, cfg.partition, cfg.routing))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    step_model = torch.compile(model, mode=args.compile_mode) if args.compile else model
    batches = itertools.cycle([(b["tokens"].to(device), b["targets"].to(device), b["routing_labels"])
                               for b in synthetic_batches(shape, vocab)])
    pos = torch.arange(shape["seq"], device=device).unsqueeze(0).expand(shape["batch"], -1)

    def step():
        inputs, targets, labels = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if name == "reference":
                loss = step_model(inputs, targets)
            else:
                with route(labels, device=device):
                    loss = step_model(inputs, pos, None, labels=targets).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def host_syncs_per_step(step, device, steps: int = 3):
    """CUDA's sync debug mode flags every host-device synchronisation a step makes."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    flagged = [str(w.message).splitlines()[0] for w in caught
               if "synchroniz" in str(w.message).lower()]
    return {"per_step": len(flagged) / steps, "first": flagged[:3]}


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_variant(name, shape, vocab, args, device):
    import torch

    torch.manual_seed(0)
    build = plain_step if name == "reference" or "plain loop" in name else engine_step
    model, step = build(name, shape, vocab, args, device)
    params = sum(p.numel() for p in model.parameters())
    b, s = shape["batch"], shape["seq"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graphs_before = _compiled_graphs()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    graphs_while_timing = _compiled_graphs() - graphs_before
    # 6N per token for the dense GEMMs plus the attention score/value products.
    flops_per_token = 6 * params + 12 * shape["layers"] * shape["hidden"] * s
    result = {
        "variant": name, "params": params, "tokens_per_s": args.steps * b * s / elapsed,
        "flops_per_token": flops_per_token, "warmup_s": warm_s, "final_loss": float(loss.detach()),
        "peak_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None,
        "host_syncs": host_syncs_per_step(step, device),
        "graphs_compiled_while_timing": graphs_while_timing,
    }
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def measure(variant, shape_name, vocab, args, device) -> list[dict]:
    """One variant's row; if the trainer's step fails, the error row and a plain-loop row of
    the same model, so one device call still yields a measurement."""
    try:
        return [run_variant(variant, SHAPES[shape_name], vocab, args, device)]
    except Exception as exc:  # keep the other measurements of this one device call
        rows = [{"variant": variant, "error": f"{type(exc).__name__}: {exc}"}]
    if variant != "reference" and "plain loop" not in variant:
        rows += measure(f"{variant} (plain loop)", shape_name, vocab, args, device)
    return rows


def print_table(rows: list[dict], shapes: list[str]) -> None:
    print(f"\n{'shape':<6} {'variant':<24} {'tok/s':>10} {'MFU':>6} {'peak GiB':>9} "
          f"{'syncs/step':>10} {'vs ref':>7}")
    for shape_name in shapes:
        mine = {r["variant"]: r for r in rows if r["shape"] == shape_name and "tokens_per_s" in r}
        ref = mine.get("reference")
        for r in (r for r in rows if r["shape"] == shape_name):
            if "tokens_per_s" not in r:
                print(f"{shape_name:<6} {r['variant']:<24} {r.get('error') or r.get('skipped')}")
                continue
            ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else math.nan
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
            peak_s = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
            syncs = f"{r['host_syncs']['per_step']:.1f}" if r.get("host_syncs") else "-"
            print(f"{shape_name:<6} {r['variant']:<24} {r['tokens_per_s']:>10.0f} {mfu:>6} "
                  f"{peak_s:>9} {syncs:>10} {ratio:>7.2f}")
        if "SGTM on" in mine and "masking off" in mine:
            cost = mine["masking off"]["tokens_per_s"] / mine["SGTM on"]["tokens_per_s"]
            print(f"{shape_name:<6} SGTM on / masking off step time: {cost:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shapes", default="64M,254M")
    parser.add_argument("--variants", default="SGTM on,masking off,reference")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for every variant (e.g. reduce-overhead)")
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke check)")
    parser.add_argument("--budget-s", type=float, default=450, help="skip what would start later")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.update({k: os.environ.get(k, v) for k, v in
                       dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0",
                            WORLD_SIZE="1", LOCAL_RANK="0").items()})
    import torch

    from megatron_sgtm.parallel import init_parallel

    device = torch.device(args.device)
    init_parallel(1, seed=0)
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    vocab = 512 if args.tiny else VOCAB
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    print(f"device: {name}; torch {torch.__version__}; compile={args.compile} "
          f"mode={args.compile_mode}", flush=True)
    started, rows = time.perf_counter(), []
    for shape_name in shapes:
        for variant in args.variants.split(","):
            if time.perf_counter() - started > args.budget_s:
                rows.append({"shape": shape_name, "variant": variant, "skipped": "time budget"})
                continue
            for row in measure(variant, shape_name, vocab, args, device):
                row["shape"] = shape_name
                if peak and "tokens_per_s" in row:
                    row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
                rows.append(row)
                print(json.dumps(row), flush=True)
    out_path = args.json or os.path.join(os.environ.get("OUT", "."), "gpu_bench.json")
    with open(out_path, "w") as fh:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, fh, indent=2)
    print_table(rows, shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
