"""``sgtm eval CKPT --data DIR``: loss and accuracy per held-out split, plain and with logit
calibration, per-token loss distribution on the forget split, and (``--generate N``) the
share of continuations of forget-domain prefixes classified as forget-domain.
``--lm-eval TASKS`` also runs lm-evaluation-harness on the checkpoint's Hugging Face export
(``--data`` is then optional; see lm_eval_run.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import read_manifest
from . import ckpt_io, lm_eval_run, shards
from .ckpt_io import PostError
from .cli_common import add_common, add_data, is_rank0, run, say, start
from .eval_export import is_hf_dir

ROUTED = ("sgtm", "gradient_routing", "activation_masking")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgtm eval", description=__doc__)
    add_common(p)
    add_data(p, required=False)
    p.add_argument("--ablate", choices=["auto", "yes", "no"], default="auto",
                   help="zero theta_forget first (auto: for routed methods)")
    p.add_argument("--calibration-steps", type=int, default=300, help="0 disables calibration")
    p.add_argument("--calibration-lr", type=float, default=1e-2)
    p.add_argument("--alpha", type=float, default=100.0)
    p.add_argument("--beta", type=float, default=100.0)
    p.add_argument("--calibration-sequences", type=int, default=64,
                   help="training sequences per domain for calibration")
    p.add_argument("--generate", type=int, default=0, help="forget-domain prompts to continue")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    lm_eval_run.add_arguments(p)
    return p


def calibration_sets(data: Path, seq: int, args, device) -> dict:
    """Training documents by true domain (never the held-out sets)."""
    out = {}
    for name, truth in (("forget", 1), ("retain", 0), ("adjacent", 2)):
        try:
            seqs = shards.sequences(data, "train", seq, args.calibration_sequences, truth=truth)
        except shards.DataError:
            if name == "adjacent":
                continue
            raise
        out[name] = shards.to_batches(seqs, args.batch, device)
    return out


def _main(args) -> int:
    from .ablate import zero_forget_
    from .calibration import CalibrationConfig, calibrate_output_bias
    from .common import model_device
    from .evaluate import evaluate, format_table, write_jsonl

    lm = lm_eval_run.request_from(args) if args.lm_eval else None  # fail fast, before loading
    if args.data is None and lm is None:
        raise PostError("--data is required (the `sgtm prep` output to evaluate on), "
                        "unless --lm-eval is given")
    tp = start(args.tp)
    if args.data is None:  # lm-eval only: the model is loaded only if it must be exported
        ablate = _ablate(args, None, tp)
        rows = _lm_eval_rows(args, lm, ablate, {"checkpoint": str(args.checkpoint),
                                                "ablated": ablate}, tp=tp)
        if args.out and is_rank0():
            write_jsonl(args.out, rows)
        return 0
    manifest = read_manifest(args.data)
    model, core, meta = ckpt_io.load(args.checkpoint, tp, args.trust_checkpoint)
    ckpt_io.check_tokenizer(meta, manifest, args.checkpoint, args.data)
    seq = args.seq or core.model.seq_length
    device = model_device(model)
    ablate = _ablate(args, core, tp)
    if ablate:
        zero_forget_(model)
    tests = shards.eval_sets(args.data, seq, args.batch, args.max_sequences, device)
    bias = None
    if args.calibration_steps > 0:
        sets = calibration_sets(args.data, seq, args, device)
        bias = calibrate_output_bias(model, sets["forget"], sets["retain"], sets.get("adjacent"),
                                     CalibrationConfig(steps=args.calibration_steps,
                                                       lr=args.calibration_lr, alpha=args.alpha,
                                                       beta=args.beta))
    results = evaluate(model, tests, bias)
    tag = {"checkpoint": str(args.checkpoint), "ablated": ablate, "method": core.routing.method}
    rows = [dict(tag, **r.row()) for r in results]
    say(format_table(results))
    if args.generate > 0:
        rows.append(dict(tag, generation=_generation(args, model, manifest, bias, seq, device)))
        say(f"generation: {rows[-1]['generation']['rate']:.3f} of continuations classified "
            "as forget-domain")
    if lm is not None:
        rows += _lm_eval_rows(args, lm, ablate, tag, model, core, meta, tp)
    if args.out and is_rank0():
        write_jsonl(args.out, rows)
    return 0


def _ablate(args, core, tp: int) -> bool:
    """Zero theta_forget first? ``auto``: for the routed methods (an HF directory: as given)."""
    if args.ablate != "auto":
        return args.ablate == "yes"
    if core is None and not is_hf_dir(args.checkpoint):
        path = ckpt_io.resolve(args.checkpoint)
        core = ckpt_io.core_config(ckpt_io.metadata(path), path, tp)
    return core is not None and core.routing.method in ROUTED


def _lm_eval_rows(args, lm, ablate: bool, tag: dict, model=None, core=None, meta=None,
                  tp: int = 1) -> list[dict]:
    request, manager = lm
    hf_dir, prov = lm_eval_run.prepare_export(args, ablate, model, core, meta, tp)
    if not is_rank0():
        return []
    return lm_eval_run.run(args, request, manager, hf_dir, prov, tag, say)


def _generation(args, model, manifest: dict, bias, seq: int, device) -> dict:
    import sentencepiece as spm

    from data_prep.errors import PrepError

    from .generation import SamplingConfig, capability_rate, generate, recipe_classifier

    try:
        classifier = recipe_classifier(manifest)
    except PrepError as exc:  # the recipe's model file has moved or changed since prep
        raise ckpt_io.PostError(f"--generate: the recipe's classifier: {exc}") from None
    if classifier is None:
        raise ckpt_io.PostError("--generate needs a classifier that works on new text; this "
                                "recipe's topic classifier is fit during prep (sgtm study "
                                "refits one), or pass a classifier callable to "
                                "megatron_sgtm.post.generation.capability_rate")
    prompts = shards.sequences(args.data, "test_forget", args.prompt_tokens - 1,
                               args.generate)[:, : args.prompt_tokens].to(device)
    rows = generate(model, prompts, SamplingConfig(args.max_new_tokens, args.temperature,
                                                   args.top_k), manifest["tokenizer"].get("eod_id"),
                    logit_bias=bias)
    sp = spm.SentencePieceProcessor(model_file=str(args.data / "tokenizer.model"))
    texts = [sp.decode(r) for r in rows]
    out = capability_rate(texts, classifier)
    out["examples"] = texts[:3]
    return out


def main(argv: list[str]) -> int:
    return run(_main, parser(), argv)
