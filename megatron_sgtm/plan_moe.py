"""MoE blocks in ``sgtm plan``: parameters per expert-parallel rank, the bytes routing and
experts save for backward, and the token dispatcher's transient buffers. Pure arithmetic.

For one GPU of an MoE block (megatron-core 0.16.1 as this project builds it, expert TP = TP):

- **parameters**: attention and norms as in a dense block; the router (``E x h``, replicated);
  ``E / EP`` routed experts, each a (SwiGLU or GELU) MLP of the expert width split over TP;
  a shared expert split over TP like a dense MLP. Routed experts are reduced over expert data
  parallelism (DP / EP), so the distributed optimizer shards their state over DP / EP only.
- **activations** per micro-batch: the router's fp32 input copy (bf16 models), logits and
  scores, and the expert MLPs on the rows this rank computes: with balanced routing
  ``s x b x top_k`` rows per EP rank (each of the EP group's ``s x b x EP`` tokens sends
  ``top_k`` rows, spread over EP ranks). This assumes balanced routing: where the router is
  imbalanced the busiest rank computes more rows than that.
- **dispatcher buffers** (transient, the largest of a block's forward): allgather holds the
  tokens gathered over TP x EP and the fp32 combine output before its reduce-scatter;
  alltoall holds the permuted rows it sends and receives.
"""
from __future__ import annotations

DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def _mlp_params(h: int, width: int, swiglu: bool, tp: int) -> int:
    return (2 if swiglu else 1) * width * h // tp + h * width // tp


def expert_width(model) -> int:
    return model.moe.expert_width(model.ffn_hidden_size)


def router_params(model) -> int:
    return model.moe.num_experts * model.hidden_size


def local_expert_params(model, tp: int = 1, ep: int = 1) -> int:
    """Routed experts on one GPU: E / EP of them, each split over (expert) TP."""
    swiglu = model.activation == "swiglu"
    per_expert = _mlp_params(model.hidden_size, expert_width(model), swiglu, tp)
    return model.moe.num_experts // ep * per_expert


def moe_mlp_params(model, tp: int = 1, ep: int = 1) -> int:
    """The MLP part of an MoE block on one GPU: router + local experts + shared expert."""
    shared = _mlp_params(model.hidden_size, model.moe.shared_expert,
                         model.activation == "swiglu", tp) if model.moe.shared_expert else 0
    return router_params(model) + local_expert_params(model, tp, ep) + shared


def active_moe_mlp_params(model) -> int:
    """The MLP parameters one token uses (TP = EP = 1): router, top_k experts, shared."""
    swiglu = model.activation == "swiglu"
    per_expert = _mlp_params(model.hidden_size, expert_width(model), swiglu, 1)
    shared = _mlp_params(model.hidden_size, model.moe.shared_expert, swiglu, 1) \
        if model.moe.shared_expert else 0
    return router_params(model) + model.moe.top_k * per_expert + shared


def expert_rows(model, layout) -> int:
    """Rows the experts of one GPU compute per micro-batch, with balanced routing."""
    return model.seq_length * layout.micro_batch * model.moe.top_k


def _mlp_activation(model, e: int, rows: int, width: int, weighted: bool) -> int:
    """Saved bytes of an expert MLP on ``rows`` rows: its input, fc1's output and what the
    activation keeps (as megatron's unfused MLP saves them: 5 widths for SwiGLU, 2 for GELU),
    plus, for routed experts, the activation output the routing weight multiplies."""
    widths = (5 if model.activation == "swiglu" else 2) + (1 if weighted else 0)
    return e * rows * (model.hidden_size + widths * width) + (4 * rows if weighted else 0)


def moe_activation_terms(model, layout) -> dict[str, int]:
    """The MLP part of an MoE block's saved activations (one micro-batch, one GPU)."""
    e = DTYPE_BYTES[layout.params_dtype]
    t, moe = layout.tp, model.moe
    local = model.seq_length * layout.micro_batch // (t if layout.sp else 1)
    rows = expert_rows(model, layout)
    terms = {
        # fp32 logits, the masked logits and the scores; the chosen ids (int64); the fp32
        # copy of the router input that bf16 models make.
        "router": 3 * 4 * local * moe.num_experts + 8 * local * moe.top_k
        + (4 * local * model.hidden_size if e == 2 else 0),
        "routed experts": _mlp_activation(model, e, rows, expert_width(model) // t, True),
    }
    if moe.shared_expert:
        tokens = model.seq_length * layout.micro_batch
        terms["shared expert"] = _mlp_activation(model, e, tokens, moe.shared_expert // t,
                                                 False)
    return terms


def dispatcher_bytes(model, layout) -> int:
    """The dispatcher's largest transient buffers in one MoE block's forward."""
    e = DTYPE_BYTES[layout.params_dtype]
    h = model.hidden_size
    if model.moe.dispatcher == "alltoall":
        return 2 * e * expert_rows(model, layout) * h
    gathered = model.seq_length * layout.micro_batch * layout.ep  # tokens of the TP x EP group
    return e * gathered * h + 4 * gathered * h  # gathered tokens + fp32 combine output
