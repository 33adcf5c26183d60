"""One-call GPU benchmark: tokens/s, MFU and peak memory at the paper's shapes and micro-batch.

For each shape it times, in the same process:
  - ours, SGTM on   (megatron-core GPTModel + SGTM linears, mixed labels every step)
  - ours, masking off (the same model class, routing method 'none')
  - a plain SDPA GPT reference built here (same width, depth, vocab, tied embeddings)
all with bf16 autocast, fused AdamW and (by default) torch.compile, and prints a short table
last. JSON goes to $OUT/gpu_bench.json (or --json).

    python bench/gpu.py                      # 64M and 254M, paper micro-batches (GPU)
    python bench/gpu.py --tiny --device cpu --no-compile --steps 2   # CPU smoke check
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

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


def our_gpt(shape, vocab, method):
    from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig
    from megatron_sgtm.model import build_model

    core = CoreConfig(
        model=ModelConfig(num_layers=shape["layers"], hidden_size=shape["hidden"],
                          num_attention_heads=shape["heads"], ffn_hidden_size=shape["ffn"],
                          vocab_size=vocab, seq_length=shape["seq"]),
        partition=PartitionConfig(forget_heads=1, forget_mlp_units=min(64, shape["ffn"] // 4),
                                  placement="last"),
        routing=RoutingConfig(method=method))
    return build_model(core)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_variant(name, shape, vocab, args, device):
    import torch

    from megatron_sgtm.routing import route

    torch.manual_seed(0)
    if name == "reference":
        model = reference_gpt(shape, vocab).to(device)
    else:
        model = our_gpt(shape, vocab, "sgtm" if name == "SGTM on" else "none").to(device)
    params = param_count(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    b, s = shape["batch"], shape["seq"]
    tokens = torch.randint(0, vocab, (b, s + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    # The paper's bilingual mix: about a quarter forget-labelled, a tenth retain-path.
    n_forget, n_retain = max(1, b // 4), max(1, b // 10)
    labels = torch.tensor([2] * n_forget + [1] * n_retain + [0] * (b - n_forget - n_retain))
    labels = labels.unsqueeze(1).expand(b, s)

    def step():
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

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    tok_s = args.steps * b * s / elapsed
    # 6N per token for the dense GEMMs plus the attention score/value products.
    flops_per_token = 6 * params + 12 * shape["layers"] * shape["hidden"] * s
    result = {
        "variant": name, "params": params, "tokens_per_s": tok_s,
        "flops_per_token": flops_per_token, "warmup_s": warm_s, "final_loss": float(loss),
        "peak_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None,
    }
    del model, step_model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shapes", default="64M,254M")
    parser.add_argument("--variants", default="SGTM on,masking off,reference")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
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
    print(f"device: {name}; torch {torch.__version__}; compile={args.compile}", flush=True)
    started, rows = time.perf_counter(), []
    for shape_name in shapes:
        for variant in args.variants.split(","):
            if time.perf_counter() - started > args.budget_s:
                rows.append({"shape": shape_name, "variant": variant, "skipped": "time budget"})
                continue
            try:
                row = run_variant(variant, SHAPES[shape_name], vocab, args, device)
            except Exception as exc:  # keep the other measurements of this one device call
                row = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}
            row["shape"] = shape_name
            if peak and "tokens_per_s" in row:
                row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
            rows.append(row)
            print(json.dumps(row), flush=True)
    out_path = args.json or os.path.join(os.environ.get("OUT", "."), "gpu_bench.json")
    with open(out_path, "w") as fh:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, fh, indent=2)
    print(f"\n{'shape':<6} {'variant':<12} {'tok/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs ref':>7}")
    for shape_name in shapes:
        ref = next((r for r in rows if r["shape"] == shape_name and r["variant"] == "reference"
                    and "tokens_per_s" in r), None)
        for r in (r for r in rows if r["shape"] == shape_name):
            if "tokens_per_s" not in r:
                print(f"{shape_name:<6} {r['variant']:<12} {r.get('error') or r.get('skipped')}")
                continue
            ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else math.nan
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
            peak_s = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
            print(f"{shape_name:<6} {r['variant']:<12} {r['tokens_per_s']:>10.0f} {mfu:>6} "
                  f"{peak_s:>9} {ratio:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
