"""The memory plan as a readable table or as JSON (``sgtm plan``)."""
from __future__ import annotations

import textwrap
from dataclasses import asdict

from .plan import GIB, Plan, checkpoint_input_bytes, layer_activation_terms, what_if

MIB = 2 ** 20


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _layout_line(plan: Plan) -> str:
    lay = plan.layout
    tp = f"TP {lay.tp}" + (" + SP" if lay.sp else "")
    pp = f"PP {lay.pp}" + (f" (VP {lay.vp})" if lay.vp else "")
    recompute = lay.recompute + (f" ({lay.recompute_num_layers} block(s) per checkpoint)"
                                 if lay.recompute == "full" else "")
    plural = "es" if lay.micro_batches > 1 else ""
    return (f"{tp} x {pp} x DP {lay.dp}; micro-batch {lay.micro_batch}, {lay.micro_batches} "
            f"micro-batch{plural} per step and DP rank; recompute {recompute}; distributed "
            f"optimizer {'on' if lay.distributed_optimizer else 'off'}; {lay.params_dtype} weights")


def _model_line(model, plan: Plan) -> str:
    heads = f"{model.num_attention_heads} heads"
    if model.num_query_groups and model.num_query_groups != model.num_attention_heads:
        heads += f" / {model.num_query_groups} query groups"
    moe = model.moe
    mlp = f"ffn {model.ffn_hidden_size} {model.activation}" if moe is None else (
        f"MoE every {moe.layer_freq} block(s): {moe.num_experts} {model.activation} experts "
        f"of width {moe.expert_width(model.ffn_hidden_size)}, top-{moe.top_k}"
        + (f", shared expert {moe.shared_expert}" if moe.shared_expert else "")
        + f", EP {plan.layout.ep}")
    return (f"{_count(plan.total_params)} parameters; {model.num_layers} layers, hidden "
            f"{model.hidden_size}, {heads}, {mlp}, "
            f"{model.normalization}, {model.position_embedding} positions, vocab "
            f"{model.vocab_size}, seq {model.seq_length}")


def _wrap(first: str, text: str) -> list[str]:
    return textwrap.wrap(text, width=96, initial_indent=first,
                         subsequent_indent=" " * len(first))


def _verdict(fits: bool) -> str:
    return "fits" if fits else "does NOT fit"


def render_text(model, plan: Plan, source: str) -> str:
    lay, worst = plan.layout, plan.worst
    gpus = f"{lay.gpus} GPU" + ("s" if lay.gpus > 1 else "")
    lines = [f"sgtm plan: {source} on {gpus} of {plan.gpu_memory_gib:g} GiB",
             *_wrap("model:  ", _model_line(model, plan)),
             *_wrap("layout: ", _layout_line(plan)), ""]
    header = ("stage", "layers", "params", "weights", "grads", "optimizer", "activations",
              "logits etc.", "total GiB")
    rows = [(str(st.stage), str(st.layers), _count(st.params), _gib(st.weights), _gib(st.grads),
             _gib(st.optimizer), _gib(st.activations), _gib(st.extras), _gib(st.total))
            for st in plan.stages]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    lines += ["", f"budget: {_gib(plan.budget)} GiB = {plan.gpu_memory_gib:g} GiB less "
              f"{plan.headroom:.0%} headroom -> {_verdict(plan.fits)} (worst: stage "
              f"{worst.stage}, {_gib(worst.total)} GiB, {worst.total / plan.budget:.0%} of the "
              "budget)"]
    terms = layer_activation_terms(model, lay)
    per_layer = sum(terms.values())
    if lay.recompute == "full":
        kept = checkpoint_input_bytes(model, lay) / MIB
        lines.append(f"activations: full recompute keeps {kept:.1f} MiB per checkpoint per "
                     f"micro-batch, plus one checkpoint's working set of "
                     f"{lay.recompute_num_layers} x {per_layer / MIB:.1f} MiB")
    else:
        lines.append(f"activations: {per_layer / MIB:.1f} MiB per block per micro-batch x "
                     f"{worst.layer_micro_batches} block-micro-batches in flight on stage "
                     f"{worst.stage}")
    lines += _wrap("  per block (MiB): ", ", ".join(f"{k} {v / MIB:.1f}"
                                                  for k, v in terms.items()))
    alternatives = {(a.sp, a.recompute, a.distributed_optimizer): p
                    for a, p in what_if(model, lay, plan.gpu_memory_gib, plan.headroom)}
    flipped = alternatives[(lay.sp, lay.recompute, not lay.distributed_optimizer)]
    which = "without the distributed optimizer" if lay.distributed_optimizer else \
        f"with the distributed optimizer (sharded over DP {lay.dp})"
    lines.append(f"{which}: optimizer "
                 f"{_gib(flipped.worst.optimizer)} GiB, total {_gib(flipped.worst.total)} GiB "
                 f"on stage {flipped.worst.stage} -> {_verdict(flipped.fits)}")
    lines += ["", "what if (worst stage total, GiB)    dist. optimizer off      on"]
    for sp, recompute in dict.fromkeys((sp, rc) for sp, rc, _ in alternatives):
        cells = [f"{_gib(p.worst.total)} {'ok ' if p.fits else 'OOM'}"
                 for p in (alternatives[(sp, recompute, False)],
                           alternatives[(sp, recompute, True)])]
        label = f"  SP {'on' if sp else 'off'}, recompute {recompute}"
        lines.append(f"{label:<36}{cells[0]:>18}{cells[1]:>14}")
    lines += _wrap("", "(activations are the eager count, an upper bound: torch.compile may "
                   "save fewer. The headroom covers what is not counted: CUDA context, NCCL "
                   "buffers, fragmentation, transient gradient buffers.)")
    return "\n".join(lines)


def to_json(model, plan: Plan, source: str) -> dict:
    lay = plan.layout
    return {
        "config": source,
        "gpus": lay.gpus,
        "gpu_memory_gib": plan.gpu_memory_gib,
        "headroom": plan.headroom,
        "budget_bytes": plan.budget,
        "fits": plan.fits,
        "worst_stage": plan.worst.stage,
        "worst_total_bytes": plan.worst.total,
        "model": {"parameters": plan.total_params, **{
            k: getattr(model, k) for k in (
                "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "activation", "normalization", "position_embedding",
                "tie_embeddings", "add_bias_linear", "vocab_size", "seq_length")}},
        "layout": asdict(lay),
        "stages": [{**asdict(st), "total": st.total} for st in plan.stages],
        "block_activation_bytes": layer_activation_terms(model, lay),
        "checkpoint_input_bytes": checkpoint_input_bytes(model, lay),
        "what_if": [{"sequence_parallel": a.sp, "recompute": a.recompute,
                     "distributed_optimizer": a.distributed_optimizer,
                     "worst_total_bytes": p.worst.total, "fits": p.fits}
                    for a, p in what_if(model, lay, plan.gpu_memory_gib, plan.headroom)],
    }
