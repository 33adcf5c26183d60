"""Initial weights that depend on the model and the seed only, never on the layout.

megatron initialises each rank's parameters from that rank's random stream: on GPU from the
model-parallel tracker (seeded per TP rank), on CPU from a full-size master weight drawn from
the default generator, whose position in the stream depends on which layers the rank built
before (so a pipeline stage draws what the first stage's layers drew at PP 1). Here every
parameter is redrawn after construction from streams keyed by its global identity:

- the key is (seed, the parameter's global name, a block index): the global name numbers
  layers across all pipeline stages and virtual chunks, and the last stage's copy of tied
  embeddings takes the embedding's name, so both copies start equal without a collective;
- a tensor is drawn in blocks of ``BLOCK`` indices along the dimension tensor parallelism
  splits (dim 0 for replicated tensors), each block from its own stream in the global shape;
  a TP rank draws only the blocks that hold its shard, and takes its rows or columns with
  megatron's own split rule (``partition_dim``/``partition_stride``: a gated fc1 shard is
  ``[gate_r; up_r]`` of the global ``[gate; up]``);
- draws are float32 on the CPU (torch's mt19937), then cast to the parameter's dtype and
  device: the same values on CPU and GPU, at every TP, PP, VP and DP size, with either engine.

The distributions are megatron's defaults: N(0, init_std) for qkv, fc1, the embeddings and an
untied output layer; N(0, init_std / sqrt(2 num_layers)) for the projections that write into
the residual stream (proj, fc2); ones for norm weights, zeros for every bias. A parameter no
rule names is an error, so a new module cannot silently keep a layout-dependent draw.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

BLOCK = 64
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# An MoE block's routed experts: local index on this expert-parallel rank.
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
TIED_EMBEDDING = "embedding.word_embeddings.weight"


class InitError(ValueError):
    """A parameter without an initialisation rule."""


@dataclass(frozen=True)
class Rule:
    kind: str  # "normal", "ones" or "zeros"
    std: float = 0.0


def rule_for(name: str, init_std: float, num_layers: int) -> Rule:
    """The initial distribution of the parameter with global name ``name``."""
    if name.endswith(".bias"):
        return Rule("zeros")
    if re.search(r"layernorm\.weight$", name):
        return Rule("ones")
    if re.search(r"\.linear_(proj|fc2)\.weight$", name):
        return Rule("normal", init_std / math.sqrt(2.0 * num_layers))
    if re.search(r"(\.linear_(qkv|fc1)\.weight|^embedding\.(word|position)_embeddings\.weight"
                 r"|^output_layer\.weight|\.mlp\.router\.weight)$", name):
        return Rule("normal", init_std)
    raise InitError(f"no initialisation rule for parameter {name!r} (add one in "
                    "megatron_sgtm/init.py)")


def global_names(chunk, ep_rank: int = 0) -> dict[str, str]:
    """This chunk's parameter names -> global names (layers numbered over all stages, routed
    experts by their global id over expert-parallel ranks; the last stage's copy of tied
    embeddings named as the embedding it copies)."""
    layers = list(chunk.decoder.layers)
    numbers = [layer.layer_number - 1 for layer in layers]
    copy = chunk.post_process and not chunk.pre_process and \
        chunk.share_embeddings_and_output_weights
    out = {}
    for name, _ in chunk.named_parameters():
        match = _LAYER.match(name)
        if match:
            local_layer = int(match.group(1))
            name_out = _LAYER.sub(f"decoder.layers.{numbers[local_layer]}.", name)
            expert = _EXPERT.search(name_out)
            if expert:
                first = ep_rank * layers[local_layer].mlp.experts.num_local_experts
                name_out = _EXPERT.sub(
                    f".mlp.experts.local_experts.{first + int(expert.group(1))}.", name_out)
            out[name] = name_out
        elif copy and name == "output_layer.weight":
            out[name] = TIED_EMBEDDING
        else:
            out[name] = name
    return out


def stream_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit generator seed for one block of one parameter (stable across processes)."""
    digest = hashlib.blake2b(f"sgtm-init/{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def shard_indices(param: torch.Tensor, tp: int, tp_rank: int) -> tuple[int, int, list[int]]:
    """(split dimension, its global length, this rank's global indices along it, in local
    order), by megatron's split rule: the global tensor is cut into ``tp x stride`` equal
    pieces along ``partition_dim`` and rank r holds pieces r, r + tp, ..."""
    if not getattr(param, "tensor_model_parallel", False):
        return 0, param.shape[0], list(range(param.shape[0]))
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    local = param.shape[dim]
    piece = local // stride
    total = local * tp
    starts = range(tp_rank * piece, total, tp * piece)
    return dim, total, [i for start in starts for i in range(start, start + piece)]


def draw_normal(seed: int, name: str, dim: int, total: int, indices: list[int],
                rest: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal float32 values at global ``indices`` along ``dim`` of a tensor whose
    other (global) dimensions are ``rest``; ``dim`` is moved back into place."""
    wanted: dict[int, list[int]] = {}
    for position, index in enumerate(indices):
        wanted.setdefault(index // BLOCK, []).append(position)
    out = torch.empty((len(indices), *rest), dtype=torch.float32)
    for block, positions in wanted.items():
        size = min(BLOCK, total - block * BLOCK)
        gen = torch.Generator().manual_seed(stream_seed(seed, name, block))
        values = torch.randn((size, *rest), generator=gen, dtype=torch.float32)
        offsets = torch.tensor([indices[p] - block * BLOCK for p in positions])
        out[torch.tensor(positions)] = values.index_select(0, offsets)
    return out.movedim(0, dim)


@dataclass(frozen=True)
class ExpertLayout:
    """Where this rank's routed experts sit: its expert-parallel rank, and the tensor
    parallelism that splits each expert (megatron's expert TP, by default the model's)."""
    ep_rank: int = 0
    tp: int = 1
    tp_rank: int = 0


@torch.no_grad()
def initialize_chunks(chunks: Iterable, seed: int, init_std: float, num_layers: int,
                      tp: int, tp_rank: int, experts: ExpertLayout = ExpertLayout()) -> None:
    """Overwrite every parameter of this rank's model chunks with its layout-free value (a
    routed expert's by its global id, so every EP size starts from the same experts)."""
    for chunk in chunks:
        names = global_names(chunk, experts.ep_rank)
        for local_name, param in chunk.named_parameters():
            name = names[local_name]
            rule = rule_for(name, init_std, num_layers)
            if rule.kind == "ones":
                param.fill_(1.0)
            elif rule.kind == "zeros":
                param.zero_()
            else:
                split = (experts.tp, experts.tp_rank) if _EXPERT.search(name) else (tp, tp_rank)
                dim, total, indices = shard_indices(param, *split)
                rest = tuple(param.shape[:dim]) + tuple(param.shape[dim + 1:])
                values = draw_normal(seed, name, dim, total, indices, rest)
                param.copy_(values.mul_(rule.std))


def resolve_seed(seed: Optional[int]) -> int:
    """``seed``, or one draw from torch's default generator (so ``torch.manual_seed(s)``
    before building still fixes the initial weights, as it did with megatron's own init)."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
