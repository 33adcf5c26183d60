"""``sgtm ablate CKPT --out DIR``: zero theta_forget; ``--prune`` writes a smaller dense model;
``--export hf`` writes a Hugging Face transformers model and a tokenizer AutoTokenizer loads to
the run's sentencepiece ids (hf_tokenizer.py)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from . import ckpt_io
from .ckpt_io import PostError
from .cli_common import add_common, atomic_dir, is_rank0, run, say, start


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgtm ablate", description=__doc__)
    add_common(p)
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--prune", action="store_true", help="remove forget units (smaller model)")
    p.add_argument("--export", choices=["hf"], default=None,
                   help="write a Hugging Face model instead of a checkpoint")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.model (or a shard directory) to ship with --export hf")
    return p


def _main(args) -> int:
    import torch.distributed as dist

    from ..model import build_model
    from .ablate import drop_forget_experts, max_abs_forget, prune_full_params, zero_forget_
    from .eval_export import find_tokenizer
    from .export_hf import export_hf
    from .hf_import import write_record
    from .hf_tokenizer import tokenizer_note
    from .layout import gather_full_params, load_full_params

    tp = start(args.tp)
    if args.out.exists():
        raise PostError(f"output {args.out}: already exists; choose another directory")
    model, core, meta = ckpt_io.load(args.checkpoint, tp, args.trust_checkpoint)
    zeroed = zero_forget_(model)
    if max_abs_forget(model) != 0.0:
        raise PostError("internal: theta_forget is not zero after ablation")
    say(f"ablate: zeroed {zeroed} theta_forget entries on rank 0 "
        f"(variant {core.routing.variant})")
    out_core, out_model, removed = core, model, []
    if args.prune or core.model.moe is not None:
        # MoE blocks always lose their forget experts (a zeroed expert would still be routed
        # to); --prune also removes the forget heads and MLP units.
        out_core, full, removed = drop_forget_experts(gather_full_params(model), core)
        if args.prune:
            out_core, full = prune_full_params(full, out_core)
        out_core.tensor_parallel = tp
        problems = out_core.problems()
        if problems:
            raise PostError("pruned model does not fit tensor_parallel="
                            f"{tp}: {'; '.join(problems)}; run with --tp 1")
        out_model = build_model(out_core)
        load_full_params(out_model, full)
        if removed:
            say(f"ablate: removed forget experts {removed} from every MoE block "
                f"({out_core.model.moe.num_experts} experts left)")
        if args.prune:
            say(f"ablate: pruned to {out_core.model.num_attention_heads} heads, "
                f"ffn {out_core.model.ffn_hidden_size}, kv_channels {out_core.model.kv_channels}")
    if args.export == "hf":
        full = gather_full_params(out_model)
        tokenizer = find_tokenizer(meta, args.tokenizer, args.checkpoint, required=False)
        if tokenizer is None:
            say("ablate: warning: no tokenizer.model found (pass --tokenizer); the export holds "
                "the model only, which AutoTokenizer cannot load")
        if is_rank0():
            tmp = atomic_dir(args.out)
            try:
                export_hf(full, out_core, tmp, tokenizer)
                write_record(tmp, out_core, meta)  # sha256 of the files, the exact config
                tmp.rename(args.out)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        if dist.is_initialized():
            dist.barrier()
        say(f"ablate: Hugging Face model written to {args.out}")
        if tokenizer is not None:
            say(f"ablate: {tokenizer_note(args.out)}")
        return 0
    ckpt_io.save(args.out, out_model, out_core, meta,
                 {"ablated": True, "pruned": bool(args.prune), "source": str(args.checkpoint),
                  "removed_experts": removed})
    say(f"ablate: checkpoint written to {args.out}")
    return 0


def main(argv: list[str]) -> int:
    return run(_main, parser(), argv)
