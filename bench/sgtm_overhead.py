"""SGTM-on vs masking-off training-step time for the same model, measured in one run.

Usage: python bench/sgtm_overhead.py [--layers 4 --hidden 256 --seq 128 --batch 8 --steps 20]
                                     [--repeat N] [--profile] [--labels 2,2,1,1,0,0,0,0]
                                     [--path sequences|tokens]
Prints the machine, both median step times and their ratio (target <= 1.05 on CPU).
``--repeat N`` runs N trials (each interleaving on/off steps) and prints the ratio's min,
median and max, so one run states its own noise. ``--profile`` prints a torch.profiler
breakdown by op category and the top ops by self time: per op, the median over alternating
profiled steps of the SGTM-on and masking-off models.
``--path tokens`` measures the per-token gather path instead of the per-sequence one (taken by
mixed-label sequences and compiled graphs).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

# Profiler op name -> category, first match wins (matched as substrings of the aten name).
CATEGORIES = (
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("token gather/scatter", ("index_select", "index_add", "index_fill", "aten::gather",
                              "aten::scatter", "aten::index", "aten::narrow_copy")),
    ("mask build", ("nonzero", "aten::eq", "aten::ne", "bitwise", "aten::__and__",
                    "aten::logical", "aten::zeros", "aten::ones", "aten::where")),
    ("masking elementwise", ("masked_fill",)),
    ("norms", ("layer_norm", "rms_norm")),
    ("attention", ("scaled_dot_product", "attention")),
    ("copies", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat")),
)


def category(name: str) -> str:
    for label, needles in CATEGORIES:
        if any(n in name for n in needles):
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="trials; prints min/median/max")
    parser.add_argument("--labels", default="",
                        help="comma-separated label per sequence (default: a quarter forget, "
                             "a quarter retain-path, the rest unlabeled)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (less distorted on a shared machine)")
    parser.add_argument("--path", choices=("sequences", "tokens"), default="sequences",
                        help="SGTM's masking path: the per-sequence one (default) or the "
                             "per-token gather path, which mixed-label sequences and "
                             "compiled graphs take")
    parser.add_argument("--profile", action="store_true", help="print a per-op breakdown")
    parser.add_argument("--top", type=int, default=15, help="ops listed by --profile")
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch

    from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig
    from megatron_sgtm.model import build_model
    from megatron_sgtm.parallel import destroy_parallel, init_parallel
    from megatron_sgtm.routing import route

    torch.set_num_threads(args.threads)
    init_parallel(1, seed=0)
    shape = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                        num_attention_heads=args.heads, ffn_hidden_size=4 * args.hidden,
                        vocab_size=args.vocab, seq_length=args.seq)
    partition = PartitionConfig(forget_heads=1, forget_mlp_units=args.hidden // 8)
    models = {}
    for name, method in (("masking off", "none"), ("SGTM on", "sgtm")):
        torch.manual_seed(0)
        models[name] = build_model(CoreConfig(model=shape, partition=partition,
                                              routing=RoutingConfig(method=method)))
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(args.seq).unsqueeze(0).expand_as(inputs)
    if args.labels:
        per_seq = [int(v) for v in args.labels.split(",")]
        if len(per_seq) != args.batch:
            parser.error(f"--labels has {len(per_seq)} entries for --batch {args.batch}")
    else:
        # A realistic mix per micro-batch: a quarter forget, a quarter retain-path, the rest plain.
        per_seq = [2, 1] + [0] * (args.batch - 2) if args.batch < 4 else (
            [2] * (args.batch // 4) + [1] * (args.batch // 4) + [0] * (args.batch - args.batch // 2))
    labels = torch.tensor(per_seq).unsqueeze(1).expand(args.batch, args.seq)

    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def step(model):
        start = clock()
        with route(labels, use_spans=args.path == "sequences"):
            loss = model(inputs, pos, None, labels=targets).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return clock() - start

    def trial() -> tuple[float, float]:
        times = {name: [] for name in models}
        for i in range(args.steps + 3):
            for name, model in models.items():  # interleaved, so drift hits both equally
                t = step(model)
                if i >= 3:
                    times[name].append(t)
        return statistics.median(times["masking off"]), statistics.median(times["SGTM on"])

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"model: {args.layers} layers, d {args.hidden}, seq {args.seq}, batch {args.batch}; "
          f"labels per sequence {per_seq}; masking path: {args.path}")
    ratios = []
    for _ in range(args.repeat):
        off, on = trial()
        ratios.append(on / off)
        print(f"masking off: {off * 1e3:.1f} ms/step   SGTM on: {on * 1e3:.1f} ms/step   "
              f"ratio {on / off:.3f}", flush=True)
    if args.repeat > 1:
        print(f"SGTM on / masking off over {args.repeat} trials: min {min(ratios):.3f}  "
              f"median {statistics.median(ratios):.3f}  max {max(ratios):.3f}")
    print(f"SGTM on / masking off step-time ratio: {statistics.median(ratios):.3f}")
    if args.profile:
        profile(models, step, args.top)
    destroy_parallel()


def profile(models, step, top: int, rounds: int = 5) -> None:
    """Per op, the median over ``rounds`` of its self CPU time in one profiled step; the
    rounds alternate the two models, so a slow spell on a shared machine hits both."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for model in models.values():
        for _ in range(2):
            step(model)  # warm caches outside the profile
    samples = {name: {} for name in models}  # name -> op -> [(self us, calls) per round]
    for _ in range(rounds):
        for name, model in models.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model)
            for e in prof.key_averages():
                samples[name].setdefault(e.key, []).append((e.self_cpu_time_total, e.count))
    tables = {name: [(key, statistics.median(us for us, _ in runs), runs[0][1])
                     for key, runs in ops.items()] for name, ops in samples.items()}
    print(f"\nper-step self CPU time by category (ms), per-op medians of {rounds} alternating "
          "profiled steps:")
    cats = [label for label, _ in CATEGORIES] + ["other"]
    per = {name: {c: 0.0 for c in cats} for name in tables}
    for name, rows in tables.items():
        for key, us, _ in rows:
            per[name][category(key)] += us / 1e3
    print(f"  {'category':<22}" + "".join(f"{n:>14}" for n in tables))
    for c in cats:
        print(f"  {c:<22}" + "".join(f"{per[n][c]:>14.2f}" for n in tables))
    print(f"  {'total':<22}" + "".join(f"{sum(per[n].values()):>14.2f}" for n in tables))
    rows = sorted(tables["SGTM on"], key=lambda r: -r[1])[:top]
    off = {key: (us, calls) for key, us, calls in tables["masking off"]}
    print(f"\ntop {top} ops of the SGTM-on step by self CPU time (ms per step, calls per step):")
    print(f"  {'op':<38}{'category':<22}{'SGTM on':>9}{'calls':>7}{'off':>9}{'calls':>7}")
    for key, us, calls in rows:
        o_us, o_calls = off.get(key, (0.0, 0))
        print(f"  {key[:37]:<38}{category(key):<22}{us / 1e3:>9.2f}{calls:>7}"
              f"{o_us / 1e3:>9.2f}{o_calls:>7}")


if __name__ == "__main__":
    main()
