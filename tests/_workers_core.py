"""Worker functions for the core proofs (run in spawned gloo processes).

The reference is deliberately independent of the code under test: a TP=1 model with routing
method 'none' (megatron's own GEMMs), forward hooks that zero/detach activations, and grads
zeroed after backward, as the paper's per-step rule does, with masks built from the global
forget ids by the plain TP=1 formulas below.
"""
from __future__ import annotations

import torch

MODEL_FAMILIES = {
    "mha_gelu": dict(num_layers=2, hidden_size=32, num_attention_heads=8, ffn_hidden_size=64,
                     vocab_size=96, seq_length=12, tie_embeddings=True),
    "gqa_swiglu": dict(num_layers=2, hidden_size=64, num_attention_heads=16, num_query_groups=8,
                       ffn_hidden_size=64, vocab_size=96, seq_length=12, activation="swiglu",
                       position_embedding="rope", normalization="RMSNorm", tie_embeddings=False,
                       output_bias=True),
}
# At TP=4 every rank holds one forget attention unit and four forget MLP units.
PARTITION = dict(forget_heads=4, forget_mlp_units=16, max_tp=4)
ROUTINGS = {
    "sgtm": dict(method="sgtm"),
    "sgtm_joint_projection": dict(method="sgtm", variant="joint_projection"),
    "sgtm_joint_attention": dict(method="sgtm", variant="joint_attention"),
    "sgtm_mask_embeddings": dict(method="sgtm", mask_embeddings=True),
    "gradient_routing": dict(method="gradient_routing"),
    "activation_masking": dict(method="activation_masking"),
}
SEQ_LABELS = [0, 1, 2, 2, 1, 0]


def core_config(family: str, routing: dict, tp: int, dtype: str = "fp32",
                sequence_parallel: bool = False):
    from megatron_sgtm.config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig

    return CoreConfig(model=ModelConfig(**MODEL_FAMILIES[family], params_dtype=dtype),
                      partition=PartitionConfig(**PARTITION), routing=RoutingConfig(**routing),
                      tensor_parallel=tp, sequence_parallel=sequence_parallel)


def sum_sequence_parallel_grads(model):
    """Under sequence parallelism each TP rank holds the norm / row-bias gradient of its own
    sequence slice; sum them over TP, as megatron's finalize_model_grads does in training."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())


def batch(family: str, seed: int = 7):
    spec = MODEL_FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    b, s = len(SEQ_LABELS), spec["seq_length"]
    tokens = torch.randint(0, spec["vocab_size"], (b, s + 1), generator=gen)
    labels = torch.tensor(SEQ_LABELS).unsqueeze(1).expand(b, s).contiguous()
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), labels


def token_loss(model, tokens, targets):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None, labels=targets)


# ---------------------------------------------------------------- reference (TP=1, hooks)
def global_masks(core):
    """theta_forget masks per parameter-name suffix at TP=1, from the global ids."""
    from megatron_sgtm.partition import build_partition

    part = build_partition(core.model, core.partition, core.routing)
    hd, hpg = part.head_dim, part.heads_per_group
    qkv_rows = [r for g in part.forget_groups for r in range(g * (hpg + 2) * hd, (g + 1) * (hpg + 2) * hd)]
    proj_cols = [c for g in part.forget_groups for c in range(g * hpg * hd, (g + 1) * hpg * hd)]
    fc1_rows = list(part.forget_mlp)
    if part.gated_mlp:
        fc1_rows += [part.mlp_units + u for u in part.forget_mlp]
    return part, {"qkv": qkv_rows, "proj": proj_cols, "fc1": fc1_rows, "fc2": list(part.forget_mlp)}


def _role_of(name):
    for role in ("qkv", "proj", "fc1", "fc2"):
        if f"linear_{role}." in name:
            return role
    return None


def retain_param_mask(name, param, core, part, masks):
    """1 where the paper's forget-step rule zeroes the gradient (theta_retain), else 0."""
    variant, mask_emb = core.routing.variant, core.routing.mask_embeddings
    masked_roles = {"default": ("qkv", "proj", "fc1", "fc2"),
                    "joint_projection": ("qkv", "fc1"), "joint_attention": ("fc1",)}[variant]
    m = torch.zeros_like(param)
    role = _role_of(name)
    layer = int(name.split(".")[2]) if name.startswith("decoder.layers.") else None
    if role in masked_roles:
        forget = masks[role] if layer in part.layers else []
        if role in ("qkv", "fc1"):
            m[:] = 1.0
            m[forget] = 0.0
        elif name.endswith(".weight"):
            m[:] = 1.0
            m[:, forget] = 0.0
        else:  # proj / fc2 output bias: theta_retain
            m[:] = 1.0
    if mask_emb and ("embeddings" in name or "layernorm" in name and "final" not in name
                     or name == "output_layer.weight"):
        m[:] = 1.0
    return m


def _gate_hooks(model, masks, part, mode):
    """Forward pre-hooks on proj/fc2 inputs: 'retain' zeroes forget columns, 'detach' detaches
    retain columns, 'zero' zeroes retain columns."""
    handles = []
    for name, module in model.named_modules():
        role = _role_of(name + ".")
        if role not in ("proj", "fc2") or not name.endswith(f"linear_{role}"):
            continue
        layer = int(name.split(".")[2])
        cols = masks[role] if layer in part.layers else []

        def hook(_mod, args, cols=cols):
            (x,) = args
            is_f = torch.zeros(x.shape[-1])
            is_f[cols] = 1.0
            if mode == "retain":
                return (x * (1 - is_f),)
            if mode == "zero":
                return (x * is_f,)
            return (x * is_f + (x * (1 - is_f)).detach(),)

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def reference_grads(core, full_state, tokens, targets, labels):
    from megatron_sgtm.config import RoutingConfig
    from megatron_sgtm.model import build_model

    plain_core = type(core)(model=core.model, partition=core.partition,
                            routing=RoutingConfig(method="none"), tensor_parallel=1)
    from tp_utils import load_full_state

    model = build_model(plain_core)
    load_full_state(model, full_state, 1, 0, core.model.activation == "swiglu")
    part, masks = global_masks(core)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    method = core.routing.method
    for i, label in enumerate(labels[:, 0].tolist()):
        model.zero_grad(set_to_none=True)
        mode = None
        if label == 1:
            mode = "retain"
        elif label == 2 and method == "gradient_routing":
            mode = "detach"
        elif label == 2 and method == "activation_masking":
            mode = "zero"
        handles = _gate_hooks(model, masks, part, mode) if mode else []
        token_loss(model, tokens[i:i + 1], targets[i:i + 1]).sum().backward()
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if label == 2 and method == "sgtm":
                g = g * (1 - retain_param_mask(name, p, core, part, masks))
            total[name] += g
    return total


# ---------------------------------------------------------------- code under test
def routed_grads(core, full_state, tokens, targets, labels, tp, rank, use_spans=True):
    """``use_spans``: the per-sequence path (seq_masking.py) where labels allow it;
    False forces the per-token path (masking.py)."""
    from megatron_sgtm.model import build_model
    from megatron_sgtm.routing import route
    from tp_utils import gather_full, load_full_state

    gated = core.model.activation == "swiglu"
    model = build_model(core)
    load_full_state(model, full_state, tp, rank, gated)
    shard = (rank, tp) if core.sequence_parallel else None
    with route(labels, use_spans=use_spans, sequence_shard=shard):
        loss = token_loss(model, tokens, targets)
    loss.sum().backward()
    if core.sequence_parallel:
        sum_sequence_parallel_grads(model)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    return loss.detach(), gather_full(grads, tp, gated)


def initial_state(family):
    from megatron_sgtm.model import build_model

    torch.manual_seed(11)
    model = build_model(core_config(family, {"method": "none"}, 1))
    with torch.no_grad():  # non-trivial norms and biases so every slice is exercised
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- per-slice gradient matrix
def slice_norms(core, grads):
    """Gradient norm of every named parameter slice (TP=1 layout)."""
    part, masks = global_masks(core)
    out = {}
    for name, g in grads.items():
        role = _role_of(name)
        if role is None:
            if name.startswith("decoder.layers."):
                out["block_norms"] = out.get("block_norms", 0.0) + g.norm().item()
            else:
                out[name] = g.norm().item()
            continue
        idx = masks[role]
        other = [i for i in range(g.shape[0 if role in ("qkv", "fc1") or name.endswith("bias") else 1])
                 if i not in set(idx)]
        kind = "b" if name.endswith("bias") else "w"
        if role in ("proj", "fc2") and kind == "b":
            out[f"{role}_b"] = out.get(f"{role}_b", 0.0) + g.norm().item()
            continue
        axis = 0 if (role in ("qkv", "fc1") or kind == "b") else 1
        for tag, rows in (("forget", idx), ("retain", other)):
            if not rows:
                continue
            piece = g.index_select(axis, torch.tensor(rows))
            key = f"{role}_{kind}_{tag}"
            out[key] = out.get(key, 0.0) + piece.norm().item()
    return out


def slice_matrix(family, full_state, dtype="fp32", use_spans=True, tp=1, rank=0,
                 sequence_parallel=False):
    """Gradient norm per slice for forget-only and retain-path-only batches, every routing;
    ``dtype`` bf16 builds the model as GPU training does (all parameters bf16). At ``tp`` > 1
    the gradients are gathered into the TP=1 layout first."""
    from megatron_sgtm.model import build_model
    from megatron_sgtm.routing import route
    from tp_utils import gather_full, load_full_state

    tokens, targets, _ = batch(family)
    result = {}
    for rname, routing in {**ROUTINGS, "none": {"method": "none"}}.items():
        core = core_config(family, routing, tp, dtype, sequence_parallel=sequence_parallel)
        gated = core.model.activation == "swiglu"
        for label in (1, 2):
            model = build_model(core)
            assert {p.dtype for p in model.parameters()} == \
                {torch.bfloat16 if dtype == "bf16" else torch.float32}
            load_full_state(model, full_state, tp, rank, gated)
            labels = torch.full(tokens.shape, label)
            shard = (rank, tp) if sequence_parallel else None
            with route(labels, use_spans=use_spans, sequence_shard=shard):
                token_loss(model, tokens, targets).sum().backward()
            if sequence_parallel:
                sum_sequence_parallel_grads(model)
            grads = gather_full({n: p.grad.float() for n, p in model.named_parameters()}, tp,
                                gated)
            result[(rname, label)] = slice_norms(core_config(family, routing, 1, dtype), grads)
    return result


# ---------------------------------------------------------------- spawned entry points
def _init(world):
    from megatron_sgtm.parallel import init_parallel

    init_parallel(world, seed=1234)


def world1(rank, world):
    _init(world)
    out = {"states": {}, "ref": {}, "ours": {}, "ours_tokens": {}, "ours_sorted": {},
           "slices": {}, "slices_tokens": {}, "slices_bf16": {}}
    order = sorted(range(len(SEQ_LABELS)), key=lambda b: -SEQ_LABELS[b])  # [2, 2, 1, 1, 0, 0]
    for family in MODEL_FAMILIES:
        full = initial_state(family)
        out["states"][family] = full
        tokens, targets, labels = batch(family)
        for rname, routing in ROUTINGS.items():
            core = core_config(family, routing, 1)
            key = (family, rname)
            out["ref"][key] = reference_grads(core, full, tokens, targets, labels)
            out["ours"][key] = routed_grads(core, full, tokens, targets, labels, 1, 0)
            out["ours_tokens"][key] = routed_grads(core, full, tokens, targets, labels, 1, 0,
                                                   use_spans=False)
            # The same sequences, ordered by label as the training loader builds batches.
            out["ours_sorted"][key] = routed_grads(core, full, tokens[order], targets[order],
                                                   labels[order], 1, 0)
        out["slices"][family] = slice_matrix(family, full)
        out["slices_tokens"][family] = slice_matrix(family, full, use_spans=False)
        out["slices_bf16"][family] = slice_matrix(family, full, dtype="bf16")
    out["ablation"] = ablation_check(out["states"], 1, 0)
    return out


def world_n(rank, world, states, sequence_parallel=False):
    _init(world)
    out = {"ours": {}, "ours_tokens": {}}
    for family, full in states.items():
        tokens, targets, labels = batch(family)
        for rname, routing in ROUTINGS.items():
            core = core_config(family, routing, world, sequence_parallel=sequence_parallel)
            for path, use_spans in (("ours", True), ("ours_tokens", False)):
                out[path][(family, rname)] = routed_grads(core, full, tokens, targets, labels,
                                                          world, rank, use_spans=use_spans)
    out["ablation"] = ablation_check(states, world, rank)
    out["collectives"] = count_collectives(states, world, rank, sequence_parallel)
    if sequence_parallel:
        out["slices"] = {family: slice_matrix(family, full, tp=world, rank=rank,
                                              sequence_parallel=True)
                         for family, full in states.items()}
    return out if rank == 0 else None


# ---------------------------------------------------------------- ablation
def ablation_check(states, tp, rank):
    """Per family/routing: max |logits(ablated) - logits(retain mode)|, and the largest
    |theta_forget| entry after ablation (gathered, TP=1 layout)."""
    from megatron_sgtm.ablation import zero_forget_
    from megatron_sgtm.model import build_model
    from megatron_sgtm.routing import route
    from tp_utils import gather_full, load_full_state

    results = {}
    for family, full in states.items():
        tokens, _, _ = batch(family)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        for rname, routing in ROUTINGS.items():
            core = core_config(family, routing, tp)
            gated = core.model.activation == "swiglu"
            model = build_model(core).eval()
            load_full_state(model, full, tp, rank, gated)
            with torch.no_grad(), route(torch.ones_like(tokens)):
                retain_logits = model(tokens, pos, None)
            zero_forget_(model)
            with torch.no_grad():
                ablated_logits = model(tokens, pos, None)
            weights = gather_full({n: p.detach() for n, p in model.named_parameters()}, tp, gated)
            part, masks = global_masks(core)
            from megatron_sgtm.routing import ablated_roles

            largest = 0.0
            for name, w in weights.items():
                role = _role_of(name)
                if role not in ablated_roles(core.routing.variant) or not masks[role]:
                    continue
                if role in ("qkv", "fc1"):
                    largest = max(largest, w[masks[role]].abs().max().item())
                elif name.endswith("weight"):
                    largest = max(largest, w[:, masks[role]].abs().max().item())
            results[(family, rname)] = ((ablated_logits - retain_logits).abs().max().item(), largest)
    return results


# ---------------------------------------------------------------- communication
def count_collectives(states, tp, rank, sequence_parallel=False):
    """Collective calls in one forward+backward, per routing method, with mixed labels, in
    order. megatron's own modules bind all-gather / reduce-scatter under aliases at import;
    those are counted under the torch name they stand for."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import layers, mappings

    from megatron_sgtm.model import build_model
    from megatron_sgtm.routing import route
    from tp_utils import load_full_state

    counts = {}
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast", "all_to_all_single", "barrier", "reduce", "send", "recv",
             "_all_gather_base", "_reduce_scatter_base")
    aliases = {"dist_all_gather_func": "all_gather_into_tensor",
               "dist_reduce_scatter_func": "reduce_scatter_tensor"}
    patched = [(dist, n, getattr(dist, n), n) for n in names if hasattr(dist, n)]
    patched += [(module, alias, getattr(module, alias), canonical)
                for module in (mappings, layers) for alias, canonical in aliases.items()
                if hasattr(module, alias)]
    calls = []

    def wrap(name, fn):
        def counted(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return counted

    family = "gqa_swiglu"
    tokens, targets, labels = batch(family)
    try:
        for module, name, fn, canonical in patched:
            setattr(module, name, wrap(canonical, fn))
        for rname, routing in {"none": {"method": "none"}, **ROUTINGS}.items():
            core = core_config(family, routing, tp, sequence_parallel=sequence_parallel)
            model = build_model(core)
            load_full_state(model, states[family], tp, rank, True)
            calls.clear()
            shard = (rank, tp) if sequence_parallel else None
            with route(labels, sequence_shard=shard):
                token_loss(model, tokens, targets).sum().backward()
            counts[rname] = list(calls)
    finally:
        for module, name, fn, _ in patched:
            setattr(module, name, fn)
    return counts
