"""What the checkpoint safety checks cost, as shares of save and load time, in one run.

Saves a model + AdamW state with ``save_checkpoint`` (which hashes every file), then loads it
with ``load_checkpoint`` (which verifies every sha256 and vets the pickled files first), and
times the pieces on their own on the same files: the sha256 record, the sha256 verification
and the pickle vetting. Files just written sit in the page cache, so these are the costs
against memory-speed reads; from cold storage reading dominates hashing and load alike.

    python bench/checkpoint_integrity.py [--layers 8 --hidden 512 --vocab 32000 --repeats 3]

Prints the machine, the checkpoint size, medians and ratios; JSON to $OUT when it is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    from prep_speed import machine as cpu  # this script's folder is on sys.path

    load = ", load %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return cpu() + load


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    import torch

    from megatron_sgtm.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
    from megatron_sgtm.checkpoint import integrity, vetting
    from megatron_sgtm.checkpoint.verify import record_files
    from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig
    from megatron_sgtm.configbase import config_to_dict
    from megatron_sgtm.model import build_model
    from megatron_sgtm.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(args.threads)
    init_parallel(1, seed=0)
    core = CoreConfig(model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                                        num_attention_heads=8, ffn_hidden_size=4 * args.hidden,
                                        vocab_size=args.vocab, seq_length=128),
                      partition=PartitionConfig(forget_heads=1, forget_mlp_units=args.hidden // 8))
    model = build_model(core)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # AdamW state exists, as in a real checkpoint
    config, part = config_to_dict(core), model.partition.to_metadata()
    params = sum(p.numel() for p in model.parameters())

    rows: dict[str, list[float]] = {k: [] for k in ("save", "record", "load", "verify", "sha256",
                                                   "vet")}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            root = Path(tmp) / f"r{i}"
            rows["save"].append(_timed(lambda: save_checkpoint(root, 1, model, opt, {"step": 1},
                                                               config, part)))
            step = root / "step_00000001"
            files = integrity.list_files(step, exclude={"sgtm_meta.json"})
            rows["record"].append(_timed(lambda: record_files(step)))
            rows["load"].append(_timed(lambda: load_checkpoint(step, model, opt, config, part)))
            rows["verify"].append(_timed(lambda: verify_checkpoint(step)))
            rows["sha256"].append(_timed(lambda: integrity.digests(step, files)))
            rows["vet"].append(_timed(lambda: vetting.vet_checkpoint(step)))
        size = sum(files.values())
    destroy_parallel()

    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {"machine": machine(), "torch": torch.__version__, "params": params,
              "checkpoint_bytes": size, "files": len(files), "repeats": args.repeats,
              "median_s": med,
              "ratios": {"sha256_record/save": med["record"] / med["save"],
                         "verify/load": med["verify"] / med["load"],
                         "vetting/load": med["vet"] / med["load"]},
              "sha256_GB_per_s": size / med["sha256"] / 1e9}
    print(f"machine: {result['machine']}, torch {torch.__version__}, {args.threads} threads")
    print(f"checkpoint: {params / 1e6:.1f}M params + AdamW state, {size / 1e6:.0f} MB in "
          f"{len(files)} files; medians of {args.repeats}")
    print(f"save {med['save']:.2f} s, of which the sha256 record {med['record']:.2f} s: "
          f"ratio {result['ratios']['sha256_record/save']:.3f}")
    print(f"load {med['load']:.2f} s, of which verification {med['verify']:.2f} s "
          f"(sha256 {med['sha256']:.2f} s, pickle vetting {med['vet']:.3f} s): "
          f"ratio {result['ratios']['verify/load']:.3f}")
    print(f"sha256 throughput: {result['sha256_GB_per_s']:.2f} GB/s")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"], "checkpoint_integrity.json")
        out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
