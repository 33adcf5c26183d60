"""Workers for the MoE proofs through the public model API (spawned gloo processes).

Models are built with ``build_model`` from the same full (TP 1, EP 1) weights at any TP x EP,
routed with ``route(labels)``, and their gradients gathered back into the full layout (experts
under their global ids). The per-example reference is deliberately independent of the code
under test: a model with routing method 'none', forward hooks that zero the dense forget
units' inputs and recompute the router's choice among the allowed experts, and theta_retain
gradients zeroed after backward, as the paper's per-step rule does.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

FAMILIES = {
    # GQA + SwiGLU + RMSNorm + rope, every block MoE with a shared expert; softmax top-2 with
    # load-balancing and z losses.
    "swiglu_shared": [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=8",
        "model.num_query_groups=4", "model.ffn_hidden_size=64", "model.vocab_size=96",
        "model.seq_length=8", "model.activation=swiglu", "model.position_embedding=rope",
        "model.normalization=RMSNorm", "model.add_bias_linear=false",
        "model.tie_embeddings=false", "model.output_bias=true",
        "model.moe={num_experts: 4, top_k: 2, ffn_hidden_size: 32, shared_expert: 32, "
        "aux_loss_coeff: 0.01, z_loss_coeff: 0.001}",
        "partition.forget_heads=2", "partition.forget_mlp_units=0", "partition.forget_experts=2",
        "partition.max_tp=2"],
    # MHA + GELU + LayerNorm + learned positions, tied embeddings; block 0 MoE (top-1
    # sigmoid), block 1 dense with forget MLP units. The paper's "last" placement: both
    # forget experts on the last EP rank (global ids differ from local ones there).
    "gelu_dense": [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.ffn_hidden_size=64", "model.vocab_size=96", "model.seq_length=8",
        "model.add_bias_linear=false",
        "model.moe={num_experts: 4, top_k: 1, layer_freq: 2, score_function: sigmoid, "
        "aux_loss_coeff: 0.01}",
        "partition.forget_heads=2", "partition.forget_mlp_units=8", "partition.forget_experts=2",
        "partition.max_tp=2", "partition.placement=last"],
}
MODES = ("learned", "forced")
SEQ_LABELS = [0, 1, 2, 2, 1, 0]
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_DENSE_ROW = re.compile(r"^decoder\.layers\.(\d+)\.(self_attention\.linear_proj|mlp\.linear_fc2)$")


def overrides(family: str, mode: str = "learned", method: str = "sgtm", tp: int = 1,
              ep: int = 1, extra=()) -> list[str]:
    layout = [f"tensor_parallel={tp}", f"expert_parallel={ep}"]
    if tp > 1:
        layout.append("sequence_parallel=true")
    return FAMILIES[family] + layout + [f"routing.method={method}",
                                        f"routing.moe_forget={mode}"] + list(extra)


def core_config(family: str, mode: str = "learned", method: str = "sgtm", tp: int = 1,
                ep: int = 1, extra=()):
    from megatron_sgtm.config import CoreConfig
    from megatron_sgtm.configbase import load_config

    return load_config(CoreConfig, None, overrides(family, mode, method, tp, ep, extra))


def reset_aux_scale():
    """megatron keeps the aux-loss gradient scale in a class attribute that its schedules set;
    direct backward passes must start from its default."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def batch(family: str, seed: int = 7, labels=SEQ_LABELS):
    spec = core_config(family).model
    gen = torch.Generator().manual_seed(seed)
    b, s = len(labels), spec.seq_length
    tokens = torch.randint(0, spec.vocab_size, (b, s + 1), generator=gen)
    routing = torch.tensor(labels).unsqueeze(1).expand(b, s).contiguous()
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), routing


def token_loss(model, tokens, targets):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None, labels=targets)


# ---------------------------------------------------------------- layouts
def ep_rank_size():
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()


def global_name(name: str, core) -> str:
    """A local parameter name with its expert's global id (EP rank r holds E/ep experts)."""
    rank, size = ep_rank_size()
    per_rank = core.model.moe.num_experts // size if core.model.moe else 0
    return _EXPERT.sub(lambda m: f".local_experts.{rank * per_rank + int(m.group(1))}.", name)


def initial_state(family: str) -> dict:
    """Full (TP 1, EP 1) weights with non-trivial norms and biases; needs a 1-rank world."""
    from megatron_sgtm.model import build_model

    torch.manual_seed(11)
    model = build_model(core_config(family, method="none"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def load_state(model, full: dict, core) -> None:
    from megatron.core import parallel_state as ps
    from tp_utils import shard

    gated = core.model.activation == "swiglu"
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(shard(name, full[global_name(name, core)], tp, rank, gated))


def gather(named: dict, core) -> dict:
    """Per-rank tensors (local names) -> the full layout under global names, on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tp_utils import unshard

    gated = core.model.activation == "swiglu"
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, tensor in named.items():
        if tp > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
            tensor = unshard(name, parts, gated)
        out[global_name(name, core)] = tensor.clone()
    rank, size = ep_rank_size()
    if size > 1:  # every EP rank contributes its own experts
        pieces = [None] * size
        dist.all_gather_object(pieces, {k: v for k, v in out.items() if _EXPERT.search(k)},
                               group=ps.get_expert_model_parallel_group())
        for piece in pieces:
            out.update(piece)
    return out


def routed_grads(core, full, tokens, targets, labels):
    """(loss, gathered grads) of one forward/backward of the mixed micro-batch."""
    from megatron_sgtm.model import build_model
    from megatron_sgtm.routing import route

    reset_aux_scale()
    model = build_model(core)
    load_state(model, full, core)
    shard = None
    if core.sequence_parallel:
        from megatron.core import parallel_state as ps

        shard = (ps.get_tensor_model_parallel_rank(), core.tensor_parallel)
    with route(labels, sequence_shard=shard):
        loss = token_loss(model, tokens, targets)
    loss.sum().backward()
    if core.sequence_parallel:
        from _workers_core import sum_sequence_parallel_grads

        sum_sequence_parallel_grads(model)
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    return loss.detach(), gather(grads, core)


# ---------------------------------------------------------------- theta_forget, by name
def theta_forget(name: str, tensor: torch.Tensor, core) -> torch.Tensor:
    """Bool mask (full layout) of the entries of ``name`` that are theta_forget."""
    from _workers_core import _role_of, global_masks

    part, masks = global_masks(core)
    mask = torch.zeros(tensor.shape, dtype=torch.bool)
    layer = _LAYER.match(name)
    if layer is None:
        return mask
    layer = int(layer.group(1))
    if ".mlp.router." in name:
        if part.has_forget_experts(layer):
            mask[list(part.forget_experts)] = True
    elif ".mlp.experts." in name:
        mask[:] = int(_EXPERT.search(name).group(1)) in part.forget_experts
    elif ".mlp.shared_experts." in name:
        pass
    elif (role := _role_of(name)) and layer in part.layers and masks[role]:
        if role in ("qkv", "fc1"):
            mask[masks[role]] = True
        elif name.endswith("weight"):
            mask[:, masks[role]] = True
    return mask


def is_joint(name: str, core) -> bool:
    """theta_joint: the final norm and the output bias; with shared (not masked) embeddings
    also the embeddings, the output layer and the block norms."""
    if name.startswith("decoder.final_layernorm") or name == "output_layer.bias":
        return True
    if core.routing.mask_embeddings:
        return False
    return (name.startswith("embedding.") or name == "output_layer.weight"
            or "layernorm" in name)


def theta_retain(name, tensor, core) -> torch.Tensor:
    if is_joint(name, core):
        return torch.zeros(tensor.shape, dtype=torch.bool)
    return ~theta_forget(name, tensor, core)


# ---------------------------------------------------------------- per-example reference
def _allowed(core, label: int) -> set | None:
    """Experts a sequence with ``label`` may use alone, or None for the learned choice."""
    from megatron_sgtm.partition import build_partition

    part = build_partition(core.model, core.partition, core.routing)
    every = set(range(part.num_experts))
    if label == 1:
        return every - set(part.forget_experts)
    if label == 2 and core.routing.moe_forget == "forced":
        return set(part.forget_experts)
    return None


def _router_hook(allowed: set, moe):
    """Recompute a router's choice among ``allowed`` experts from its own weights."""
    def hook(module, args, _output):
        x = args[0]
        logits = F.linear(x.float(), module.weight.float(),
                          None if module.bias is None else module.bias.float())
        logits = logits.reshape(-1, moe.num_experts)
        banned = torch.tensor([e not in allowed for e in range(moe.num_experts)])
        logits = logits.masked_fill(banned, float("-inf"))
        top, index = logits.topk(moe.top_k, dim=1)
        if moe.score_function == "sigmoid":
            weights = torch.sigmoid(top)
            if moe.top_k > 1:
                weights = weights / weights.sum(-1, keepdim=True)
        elif moe.pre_softmax:
            weights = torch.softmax(logits, -1).gather(1, index)
        else:
            weights = torch.softmax(top, -1)
        probs = torch.zeros_like(logits).scatter(1, index, weights)
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)
        return probs, chosen
    return hook


def _dense_retain_path_hooks(model, core):
    """Zero the inputs of dense proj / fc2 at the forget units (the retain path)."""
    from _workers_core import global_masks

    part, masks = global_masks(core)
    handles = []
    for name, module in model.named_modules():
        match = _DENSE_ROW.match(name)
        if not match or int(match.group(1)) not in part.layers:
            continue
        cols = masks["proj" if "linear_proj" in name else "fc2"]

        def hook(_mod, args, cols=cols):
            keep = torch.ones(args[0].shape[-1])
            keep[cols] = 0.0
            return (args[0] * keep,)
        handles.append(module.register_forward_pre_hook(hook))
    return handles


def reference_grads(core, full, tokens, targets, labels):
    """Sum over sequences of the per-step rule applied to each sequence alone."""
    from megatron_sgtm.config import RoutingConfig
    from megatron_sgtm.model import build_model

    plain = type(core)(model=core.model, partition=core.partition,
                       routing=RoutingConfig(method="none"))
    reset_aux_scale()
    model = build_model(plain)
    load_state(model, full, plain)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i, label in enumerate(labels[:, 0].tolist()):
        model.zero_grad(set_to_none=True)
        handles = _dense_retain_path_hooks(model, core) if label == 1 else []
        allowed = _allowed(core, label)
        if allowed is not None:
            handles += [m.register_forward_hook(_router_hook(allowed, core.model.moe))
                        for n, m in model.named_modules() if n.endswith("mlp.router")]
        token_loss(model, tokens[i:i + 1], targets[i:i + 1]).sum().backward()
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if label == 2:
                grad = grad.masked_fill(theta_retain(name, grad, core), 0.0)
            total[name] += grad
    return total


# ---------------------------------------------------------------- forget-content invariance
def invariance(core, full, labels, seed: int):
    """Gradients before and after the forget-labelled sequences get new content (tokens and
    targets): (largest change outside theta_forget and theta_joint, largest change inside
    theta_forget, names whose non-forget part changed)."""
    tokens, targets, _ = batch_from(core, seed, labels)
    _, before = routed_grads(core, full, tokens, targets, labels)
    forget_rows = labels[:, 0] == 2
    gen = torch.Generator().manual_seed(seed + 1000)
    fresh = torch.randint(0, core.model.vocab_size, tokens.shape, generator=gen)
    tokens2, targets2 = tokens.clone(), targets.clone()
    tokens2[forget_rows], targets2[forget_rows] = fresh[forget_rows], fresh.flip(1)[forget_rows]
    _, after = routed_grads(core, full, tokens2, targets2, labels)
    outside, inside, changed = 0.0, 0.0, []
    for name, grad in before.items():
        diff = (after[name] - grad).abs()
        forget = theta_forget(name, grad, core)
        fixed = ~forget & ~torch.tensor(is_joint(name, core)).expand(forget.shape)
        if bool((diff[fixed] != 0).any()):
            changed.append(name)
        outside = max(outside, diff[fixed].max().item() if fixed.any() else 0.0)
        inside = max(inside, diff[forget].max().item() if forget.any() else 0.0)
    return outside, inside, changed


def batch_from(core, seed: int, labels):
    gen = torch.Generator().manual_seed(seed)
    b, s = labels.shape
    tokens = torch.randint(0, core.model.vocab_size, (b, s + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), labels


# ---------------------------------------------------------------- per-label isolation
def label_isolation(core, full, label: int):
    """One micro-batch whose sequences all carry ``label``: per parameter, the largest
    gradient entry on theta_retain and on theta_forget (full layout)."""
    tokens, targets, labels = batch_from(core, 3, torch.full((4, core.model.seq_length), label))
    _, grads = routed_grads(core, full, tokens, targets, labels)
    out = {}
    for name, grad in grads.items():
        retain, forget = theta_retain(name, grad, core), theta_forget(name, grad, core)
        out[name] = (grad[retain].abs().max().item() if retain.any() else None,
                     grad[forget].abs().max().item() if forget.any() else None)
    return out


# ---------------------------------------------------------------- checks shared by the tests
def check_isolation(results: dict, what: str) -> None:
    """results[(family, mode, label)][name] = (max |grad| on theta_retain, on theta_forget)."""
    for (family, mode, label), per_param in results.items():
        learned_forget = False
        for name, (retain, forget) in per_param.items():
            where = f"{what} {family}/{mode} label {label}: {name}"
            if label == 2:
                assert retain in (None, 0.0), f"{where}: theta_retain learned ({retain})"
                learned_forget |= bool(forget)
            else:
                assert forget in (None, 0.0), f"{where}: theta_forget learned ({forget})"
                assert retain is None or retain > 0 or "layernorm" in name or \
                    name == "output_layer.bias", f"{where}: theta_retain idle"
        if label == 2:
            assert learned_forget, f"{what} {family}/{mode}: forget tokens trained nothing"
        forget_expert = [f for n, (_r, f) in per_param.items()
                         if ".local_experts." in n and f is not None]
        assert forget_expert, f"{what} {family}: no forget expert in the check"
        if label == 2:
            assert max(forget_expert) > 0, f"{what} {family}/{mode}: forget experts idle"


def check_invariance(results: dict, what: str) -> None:
    for key, (outside, inside, changed) in results.items():
        assert outside == 0.0 and not changed, \
            f"{what} {key}: forget content moved gradients outside theta_forget: {changed}"
        assert inside > 0, f"{what} {key}: the new forget content changed nothing (vacuous)"


# ---------------------------------------------------------------- ablation and routing
def count_assignments(model, tokens) -> dict[int, torch.Tensor]:
    """Per MoE block, how many tokens the router sends to each expert (held-out forward)."""
    counts = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            layer = int(_LAYER.match(name).group(1))

            def hook(_mod, _args, output, layer=layer):
                counts[layer] = counts.get(layer, 0) + output[1].sum(0)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        token_loss(model, tokens, tokens)
    for handle in handles:
        handle.remove()
    return counts


def ablation_check(core, full, tokens):
    """Retain-mode logits of the trained model, logits and router assignments after
    ablation, assignments before it, and the largest theta_forget entry left."""
    from megatron_sgtm.ablation import zero_forget_
    from megatron_sgtm.model import build_model
    from megatron_sgtm.post.ablate import max_abs_forget
    from megatron_sgtm.routing import route

    model = build_model(core).eval()
    load_state(model, full, core)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    before = count_assignments(model, tokens)
    with torch.no_grad(), route(torch.ones_like(tokens)):
        retain_logits = model(tokens, pos, None)
    forget_before = max_abs_forget(model)
    zero_forget_(model)
    with torch.no_grad():
        ablated_logits = model(tokens, pos, None)
    return {"retain_logits": retain_logits, "ablated_logits": ablated_logits,
            "before": before, "after": count_assignments(model, tokens),
            "forget_before": forget_before, "forget_after": max_abs_forget(model)}


# ---------------------------------------------------------------- spawned entry points
NO_AUX = ["model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"]
STRICT = ["routing.mask_embeddings=true"]


def _init(ep: int = 1, tp: int = 1):
    from megatron_sgtm.parallel import init_parallel

    init_parallel(tp, seed=1234, expert_parallel=ep)


def world1(rank, world):
    """Every single-process MoE proof: reference, isolation, invariance, ablation."""
    _init()
    out = {"states": {}, "ref": {}, "ours": {}, "plain": {}, "isolation": {}, "invariance": {},
           "ablation": {}}
    for family in FAMILIES:
        full = initial_state(family)
        out["states"][family] = full
        for mode in MODES:
            key = (family, mode)
            core = core_config(family, mode, extra=NO_AUX)
            tokens, targets, labels = batch(family)
            out["ref"][key] = reference_grads(core, full, tokens, targets, labels)
            out["ours"][key] = routed_grads(core, full, tokens, targets, labels)[1]
            for label in (1, 2):
                out["isolation"][key + (label,)] = label_isolation(
                    core_config(family, mode, extra=STRICT), full, label)
            out["invariance"][key] = invariance(core_config(family, mode, extra=STRICT), full,
                                                batch(family)[2], seed=5)
        plain = core_config(family, method="none", extra=NO_AUX)
        out["plain"][family] = routed_grads(plain, full, *batch(family))[1]
        held_out = batch(family, seed=99, labels=[0] * 8)[0]
        out["ablation"][family] = ablation_check(core_config(family), full, held_out)
    return out


def world_ep(rank, world, states, ep: int, tp: int = 1):
    """The public-API proofs at EP (x TP): forget-content invariance for both forget-routing
    choices (each rank's own label mix), and per-label isolation."""
    _init(ep, tp)
    out = {"invariance": {}, "isolation": {}}
    rank_labels = torch.tensor([[2, 0, 1, 2], [1, 2, 2, 0]][rank % 2]).unsqueeze(1)
    for family, full in states.items():
        for mode in MODES:
            core = core_config(family, mode, tp=tp, ep=ep, extra=STRICT)
            labels = rank_labels.expand(4, core.model.seq_length).contiguous()
            out["invariance"][(family, mode)] = invariance(core, full, labels, seed=5 + rank)
            for label in (1, 2):
                out["isolation"][(family, mode, label)] = label_isolation(core, full, label)
    return out
