"""SGTM-on vs masking-off training-step time for the same model, measured in one run.

Usage: python bench/sgtm_overhead.py [--layers 4 --hidden 256 --seq 128 --batch 8 --steps 20]
Prints the machine, both median step times and their ratio (target <= 1.05 on CPU).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
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
    # A realistic mix per micro-batch: a quarter forget, a quarter retain-path, the rest plain.
    per_seq = [2, 1] + [0] * (args.batch - 2) if args.batch < 4 else (
        [2] * (args.batch // 4) + [1] * (args.batch // 4) + [0] * (args.batch - args.batch // 2))
    labels = torch.tensor(per_seq).unsqueeze(1).expand(args.batch, args.seq)

    def step(model):
        start = time.perf_counter()
        with route(labels):
            loss = model(inputs, pos, None, labels=targets).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {name: [] for name in models}
    for i in range(args.steps + 3):
        for name, model in models.items():  # interleaved, so drift hits both equally
            t = step(model)
            if i >= 3:
                times[name].append(t)
    off = statistics.median(times["masking off"])
    on = statistics.median(times["SGTM on"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads")
    print(f"model: {args.layers} layers, d {args.hidden}, seq {args.seq}, batch {args.batch}; "
          f"labels per sequence {per_seq}")
    print(f"masking off: {off * 1e3:.1f} ms/step   SGTM on: {on * 1e3:.1f} ms/step")
    print(f"SGTM on / masking off step-time ratio: {on / off:.3f}")
    destroy_parallel()


if __name__ == "__main__":
    main()
