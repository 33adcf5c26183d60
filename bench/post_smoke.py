"""Post-training smoke run on real bilingual text (CPU, minutes).

Trains two tiny models on the same shards (English retain, Spanish forget; ``sgtm prep
--recipe configs/data/bilingual.yaml``): SGTM and no-filter. Then reports
- forget / retain loss (plain and calibrated) of the ablated SGTM model and of no-filter,
- the Spanish-continuation rate of generations from Spanish prefixes,
- adversarial fine-tuning: steps and forget tokens until ablated SGTM reaches no-filter's
  forget loss,
- RMU on the no-filter model: its forget / retain losses.

The loop here is deliberately minimal (torch AdamW over ``route(labels)``, label-homogeneous
sequences packed per applied label); the real training loop lives in megatron_sgtm.train.

    OMP_NUM_THREADS=1 python bench/post_smoke.py --data DIR [--steps 400] [--out results.jsonl]

(One intra-op thread: on a shared 2-core machine more threads oversubscribe and run slower.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load_split(data: Path, split: str, seq: int, max_seqs: int | None = None,
               by_label: bool = False):
    """Concatenate documents (per applied label if ``by_label``) and cut ``seq + 1`` chunks."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    toks = IndexedDataset(str(data / f"{split}_tokens"))
    labs = IndexedDataset(str(data / f"{split}_labels"))
    groups: dict[int, list[np.ndarray]] = {}
    for i in range(len(toks)):
        label = int(labs[i][0]) if by_label else 0
        groups.setdefault(label, []).append(np.asarray(toks[i], dtype=np.int64))
    chunks, labels = [], []
    for label, docs in sorted(groups.items()):
        flat = np.concatenate(docs)
        n = len(flat) // (seq + 1)
        chunks.append(flat[: n * (seq + 1)].reshape(n, seq + 1))
        labels += [label] * n
    out = torch.from_numpy(np.concatenate(chunks))
    lab = torch.tensor(labels)
    if max_seqs is not None:
        keep = torch.randperm(len(out), generator=torch.Generator().manual_seed(0))[:max_seqs]
        out, lab = out[keep], lab[keep]
    return out, lab


def eval_batches(seqs: torch.Tensor, bs: int):
    from megatron_sgtm.post.common import Batch

    return [Batch(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seqs.split(bs)]


def sampler(seqs: torch.Tensor, labels: torch.Tensor, bs: int, seed: int):
    from megatron_sgtm.post.common import Batch

    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(seqs), (bs,), generator=gen)
        s = seqs[idx]
        yield Batch(s[:, :-1].contiguous(), s[:, 1:].contiguous(),
                    labels=labels[idx].unsqueeze(1).expand(bs, s.shape[1] - 1).contiguous())


def train(core, seqs, labels, steps: int, bs: int, lr: float, seed: int, log):
    """AdamW (wd 0.1, betas 0.9/0.95), linear warm-up, cosine to 0; routing by label."""
    from megatron_sgtm.model import build_model
    from megatron_sgtm.post.common import positions
    from megatron_sgtm.routing import route

    torch.manual_seed(seed)
    model = build_model(core)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 10)
    data = sampler(seqs, labels, bs, seed)
    start = time.time()
    for step in range(steps):
        f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        b = next(data)
        with route(b.labels if core.routing.method != "none" else None):
            loss = model(b.tokens, positions(b.tokens), None, labels=b.targets).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"  {core.routing.method} step {step + 1}: loss {loss.item():.3f} "
                f"({time.time() - start:.0f}s)")
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--attack-steps", type=int, default=300)
    ap.add_argument("--rmu-alpha", type=float, default=100.0)
    ap.add_argument("--rmu-lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29555"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig
    from megatron_sgtm.parallel import init_parallel
    from megatron_sgtm.post import ablate, attack, calibration, evaluate, generation, rmu
    import sentencepiece as spm

    t0 = time.time()
    log = lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", flush=True)  # noqa: E731
    manifest = json.loads((args.data / "manifest.json").read_text())
    vocab = manifest["tokenizer"]["vocab_size"]
    init_parallel(1, seed=0)
    train_seqs, train_labels = load_split(args.data, "train", args.seq, by_label=True)
    counts = {int(k): int((train_labels == k).sum()) for k in train_labels.unique()}
    log(f"train sequences per applied label (0 unl, 1 retain, 2 forget): {counts}")
    test = {name: eval_batches(load_split(args.data, f"test_{name}", args.seq, 64)[0], 16)
            for name in ("forget", "retain")}
    model_cfg = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4,
                            ffn_hidden_size=512, vocab_size=vocab, seq_length=args.seq)
    part = PartitionConfig(forget_heads=1, forget_mlp_units=64)
    results: list[dict] = []

    def report(tag, model, bias=None):
        for r in evaluate.evaluate(model, test, bias, distribution_split=None):
            row = {"model": tag, **r.row()}
            results.append(row)
            log(f"  {tag:<22} {r.split:<7} calibrated={r.calibrated!s:<5} loss {r.loss:.3f} "
                f"acc {r.accuracy:.3f}")

    cores = {m: CoreConfig(model=model_cfg, partition=part, routing=RoutingConfig(method=m))
             for m in ("sgtm", "none")}
    log("training SGTM and no-filter ...")
    sgtm = train(cores["sgtm"], train_seqs, train_labels, args.steps, args.batch, args.lr, 1, log)
    nofilter = train(cores["none"], train_seqs, train_labels, args.steps, args.batch, args.lr, 1, log)
    report("sgtm (not ablated)", sgtm)
    ablate.zero_forget_(sgtm)
    cal = calibration.CalibrationConfig(steps=200)
    cal_batches = {k: v[:2] for k, v in test.items()}
    for tag, model in (("sgtm ablated", sgtm), ("no-filter", nofilter)):
        bias = calibration.calibrate_output_bias(model, cal_batches["forget"], cal_batches["retain"], cfg=cal)
        report(tag, model, bias)

    sp = spm.SentencePieceProcessor(model_file=str(args.data / "tokenizer.model"))
    classify = generation.language_classifier(("en", "es"), "es")
    prompts = test["forget"][0].tokens[:, :16]
    for tag, model in (("sgtm ablated", sgtm), ("no-filter", nofilter)):
        cont = generation.generate(model, prompts, generation.SamplingConfig(
            max_new_tokens=32, temperature=0.8, top_k=40), eod_id=manifest["tokenizer"]["eod_id"])
        rate = generation.capability_rate([sp.decode(c) for c in cont], classify)
        results.append({"model": tag, "generation": rate})
        log(f"  {tag:<22} Spanish continuation rate {rate['rate']:.2f} ({rate['flagged']}/{rate['total']})")

    target = next(r["loss"] for r in results if r.get("model") == "no-filter"
                  and r.get("split") == "forget" and not r.get("calibrated"))
    f_seqs = train_seqs[train_labels == 2]
    r_seqs = train_seqs[train_labels != 2]
    acfg = attack.AttackConfig(lr=1e-3, warmup_steps=max(1, args.attack_steps // 10), cosine_steps=args.attack_steps,
                               max_steps=args.attack_steps, eval_every=25)
    log(f"attack (lr {acfg.lr}, warm-up {acfg.warmup_steps}, cosine {acfg.cosine_steps}) "
        f"to no-filter forget loss {target:.3f} ...")
    res = attack.adversarial_finetune(
        sgtm, sampler(f_seqs, torch.full((len(f_seqs),), 2), args.batch // 2, 5),
        sampler(r_seqs, torch.ones(len(r_seqs), dtype=torch.long), args.batch // 2, 6),
        test["forget"][:2], target, acfg)
    results.append({"model": "sgtm ablated", "attack": res.row()})
    log(f"  steps to target: {res.steps_to_target}, forget tokens: {res.forget_tokens_to_target}, "
        f"curve: {[(c['step'], round(c['forget_loss'], 3)) for c in res.curve]}")

    rcfg = rmu.RMUConfig(layer=2, steering_coeff=20.0, alpha=args.rmu_alpha, lr=args.rmu_lr,
                         steps=250, batch_size=4)
    log(f"RMU on no-filter: {rcfg}")
    rmu.rmu_unlearn(nofilter, sampler(f_seqs, torch.full((len(f_seqs),), 2), 4, 7),
                    sampler(r_seqs, torch.ones(len(r_seqs), dtype=torch.long), 4, 8), rcfg, log)
    report("no-filter + RMU", nofilter)
    if args.out:
        evaluate.write_jsonl(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
