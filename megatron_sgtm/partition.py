"""Pure index math: which rows and columns of each tensor-parallel shard are forget units.

Nothing here imports torch, so the layout rules can be tested exhaustively and cheaply.

Layouts (megatron-core 0.16.1):
- ``linear_qkv`` rows are grouped per query group as ``[q * heads_per_group, k, v]`` head
  slices; rank r owns whole groups ``[r*G/tp, (r+1)*G/tp)``.
- ``linear_proj`` columns are the local heads in order, ``head_dim`` columns each.
- ``linear_fc1`` rows are the local MLP units; with a gated activation the local shard is
  ``[gate_local; up_local]``.
- ``linear_fc2`` columns are the local MLP units.
- MoE blocks (``model.moe``): experts are whole units. Expert-parallel rank r holds experts
  ``[r*E/ep, (r+1)*E/ep)`` as ``local_experts.{e - r*E/ep}``; the router's rows are the
  experts in global order on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Sequence


class PartitionError(ValueError):
    """A partition that cannot be laid out on the requested model or tensor-parallel size."""


Runs = tuple[tuple[int, int], ...]


def to_runs(indices: Sequence[int]) -> Runs:
    """Sorted indices -> maximal half-open runs ``((start, stop), ...)``."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return tuple(runs)


def block_strided_ids(num_units: int, num_forget: int, max_tp: int) -> tuple[int, ...]:
    """Forget ids spread over ``B = gcd(num_units, max_tp)`` equal blocks, at the end of each.

    Block j gets ``floor((j+1)f/B) - floor(jf/B)`` forget units, so counts differ by at most one
    and, for f < B, the occupied blocks are spaced evenly (f=1 puts the unit last). The set
    depends only on (num_units, f, max_tp), never on the TP size that later shards it.
    """
    if num_forget == 0:
        return ()
    blocks = gcd(num_units, max_tp)
    size = num_units // blocks
    ids: list[int] = []
    for j in range(blocks):
        count = (j + 1) * num_forget // blocks - j * num_forget // blocks
        if count > size:
            raise PartitionError(
                f"{num_forget} forget units do not fit in {blocks} blocks of {size} units")
        end = (j + 1) * size
        ids.extend(range(end - count, end))
    return tuple(ids)


def last_ids(num_units: int, num_forget: int) -> tuple[int, ...]:
    """The paper's placement: the last f units (all on the last TP rank)."""
    return tuple(range(num_units - num_forget, num_units))


@dataclass(frozen=True)
class LocalPartition:
    """Local (per TP rank) forget indices for one layer's four linears."""

    tp: int
    rank: int
    qkv_rows: tuple[int, ...]
    proj_cols: tuple[int, ...]
    fc1_rows: tuple[int, ...]
    fc2_cols: tuple[int, ...]
    qkv_size: int
    proj_size: int
    fc1_size: int
    fc2_size: int

    def units(self, role: str) -> tuple[int, ...]:
        return {"qkv": self.qkv_rows, "proj": self.proj_cols,
                "fc1": self.fc1_rows, "fc2": self.fc2_cols}[role]

    def size(self, role: str) -> int:
        return {"qkv": self.qkv_size, "proj": self.proj_size,
                "fc1": self.fc1_size, "fc2": self.fc2_size}[role]

    def runs(self, role: str) -> Runs:
        return to_runs(self.units(role))


@dataclass(frozen=True)
class Partition:
    """The global forget set of a model: attention units (query groups) and MLP units per layer."""

    num_layers: int
    query_groups: int
    heads_per_group: int
    head_dim: int
    mlp_units: int
    gated_mlp: bool
    forget_groups: tuple[int, ...]
    forget_mlp: tuple[int, ...]
    layers: tuple[int, ...]
    placement: str
    max_tp: int
    # MoE blocks: experts per block, the global forget expert ids, the MoE blocks and those
    # of them holding forget experts (moe_layers x layers).
    num_experts: int = 0
    forget_experts: tuple[int, ...] = ()
    moe_layers: tuple[int, ...] = ()
    max_ep: int = 8

    @property
    def expert_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer in self.moe_layers if layer in self.layers)

    def has_forget_experts(self, layer: int) -> bool:
        return layer in self.expert_layers

    def local_forget_experts(self, ep: int, rank: int) -> tuple[int, ...]:
        """Local indices (``local_experts.{i}``) of the forget experts on EP rank ``rank``."""
        self.check_ep(ep)
        per_rank = self.num_experts // ep
        return tuple(e - rank * per_rank for e in self.forget_experts
                     if rank * per_rank <= e < (rank + 1) * per_rank)

    def check_ep(self, ep: int) -> None:
        if not self.num_experts:
            return
        if self.num_experts % ep:
            raise PartitionError(f"num_experts = {self.num_experts} is not divisible by "
                                 f"expert_parallel = {ep}")
        if self.placement == "block_strided":
            counts = self._rank_counts(self.num_experts, self.forget_experts, ep)
            if len(set(counts)) > 1:
                raise PartitionError(
                    f"{len(self.forget_experts)} forget experts cannot be split evenly over "
                    f"expert_parallel = {ep} ranks (per-rank counts would be {counts}); use a "
                    f"forget expert count divisible by {ep}")

    def has_forget_units(self, layer: int) -> bool:
        return layer in self.layers

    def to_metadata(self) -> dict:
        """The global ids, as stored in every checkpoint."""
        return {
            "forget_groups": list(self.forget_groups),
            "forget_mlp": list(self.forget_mlp),
            "layers": list(self.layers),
            "placement": self.placement,
            "query_groups": self.query_groups,
            "mlp_units": self.mlp_units,
            # MoE keys only for MoE models, so dense checkpoints keep their metadata.
            **({"forget_experts": list(self.forget_experts), "num_experts": self.num_experts,
                "moe_layers": list(self.moe_layers)} if self.num_experts else {}),
        }

    def _rank_counts(self, num_units: int, ids: tuple[int, ...], tp: int) -> list[int]:
        per_rank = num_units // tp
        counts = [0] * tp
        for i in ids:
            counts[i // per_rank] += 1
        return counts

    def check_tp(self, tp: int) -> None:
        problems = []
        if self.query_groups % tp:
            problems.append(
                f"num_query_groups (or heads) = {self.query_groups} is not divisible by "
                f"tensor_parallel = {tp}")
        if self.mlp_units % tp:
            problems.append(f"ffn_hidden_size = {self.mlp_units} is not divisible by "
                            f"tensor_parallel = {tp}")
        if not problems and self.placement == "block_strided":
            for what, units, ids in (("attention", self.query_groups, self.forget_groups),
                                     ("MLP", self.mlp_units, self.forget_mlp)):
                counts = self._rank_counts(units, ids, tp)
                if len(set(counts)) > 1:
                    problems.append(
                        f"{len(ids)} forget {what} units cannot be split evenly over "
                        f"tensor_parallel = {tp} ranks (per-rank counts would be {counts}); "
                        f"use a forget count divisible by {tp}")
        if problems:
            raise PartitionError("; ".join(problems))

    def local(self, tp: int, rank: int) -> LocalPartition:
        self.check_tp(tp)
        groups_local = self.query_groups // tp
        g0 = rank * groups_local
        rows_per_group = (self.heads_per_group + 2) * self.head_dim
        cols_per_group = self.heads_per_group * self.head_dim
        local_groups = [g - g0 for g in self.forget_groups if g0 <= g < g0 + groups_local]
        qkv_rows = tuple(r for g in local_groups
                         for r in range(g * rows_per_group, (g + 1) * rows_per_group))
        proj_cols = tuple(c for g in local_groups
                          for c in range(g * cols_per_group, (g + 1) * cols_per_group))
        units_local = self.mlp_units // tp
        u0 = rank * units_local
        local_units = [u - u0 for u in self.forget_mlp if u0 <= u < u0 + units_local]
        fc1_rows = tuple(local_units)
        if self.gated_mlp:
            fc1_rows = fc1_rows + tuple(units_local + u for u in local_units)
        return LocalPartition(
            tp=tp, rank=rank, qkv_rows=qkv_rows, proj_cols=proj_cols, fc1_rows=fc1_rows,
            fc2_cols=tuple(local_units),
            qkv_size=groups_local * rows_per_group, proj_size=groups_local * cols_per_group,
            fc1_size=units_local * (2 if self.gated_mlp else 1), fc2_size=units_local)


def build_partition(model, partition, routing=None) -> Partition:
    """Global forget ids from a ModelConfig and PartitionConfig (duck-typed, no torch)."""
    groups = model.num_query_groups or model.num_attention_heads
    forget_heads = partition.forget_heads
    if routing is not None and getattr(routing, "variant", "default") == "joint_attention":
        forget_heads = 0  # attention is joint in this variant: it has no forget heads
    problems = []
    if forget_heads > groups:
        problems.append(f"forget_heads = {forget_heads} exceeds the {groups} attention units")
    if partition.forget_mlp_units > model.ffn_hidden_size:
        problems.append(f"forget_mlp_units = {partition.forget_mlp_units} exceeds "
                        f"ffn_hidden_size = {model.ffn_hidden_size}")
    layers = tuple(range(model.num_layers)) if partition.layers is None else tuple(
        sorted(partition.layers))
    bad = [layer for layer in layers if not 0 <= layer < model.num_layers]
    if bad:
        problems.append(f"partition.layers {bad} outside 0..{model.num_layers - 1}")
    moe = getattr(model, "moe", None)
    moe_layers = () if moe is None else tuple(
        i for i in range(model.num_layers) if moe.is_moe_layer(i))
    num_experts = 0 if moe is None else moe.num_experts
    forget_experts = getattr(partition, "forget_experts", 0)
    if moe is not None and len(moe_layers) == model.num_layers and partition.forget_mlp_units:
        problems.append(f"forget_mlp_units = {partition.forget_mlp_units}: every block is an "
                        "MoE block, so there is no dense MLP to hold forget units (set it to 0; "
                        "partition.forget_experts sets the forget experts)")
    if forget_experts >= max(num_experts, 1):
        problems.append(f"forget_experts = {forget_experts} needs more experts than that "
                        f"(model.moe.num_experts = {num_experts})")
    if problems:
        raise PartitionError("; ".join(problems))
    max_ep = getattr(partition, "max_ep", 8)
    if partition.placement == "last":
        groups_ids = last_ids(groups, forget_heads)
        mlp_ids = last_ids(model.ffn_hidden_size, partition.forget_mlp_units)
        expert_ids = last_ids(num_experts, forget_experts)
    else:
        groups_ids = block_strided_ids(groups, forget_heads, partition.max_tp)
        mlp_ids = block_strided_ids(model.ffn_hidden_size, partition.forget_mlp_units,
                                    partition.max_tp)
        expert_ids = block_strided_ids(num_experts, forget_experts, max_ep) if num_experts else ()
    return Partition(
        num_layers=model.num_layers, query_groups=groups,
        heads_per_group=model.num_attention_heads // groups,
        head_dim=getattr(model, "kv_channels", None) or model.hidden_size // model.num_attention_heads,
        mlp_units=model.ffn_hidden_size, gated_mlp=model.activation == "swiglu",
        forget_groups=groups_ids, forget_mlp=mlp_ids, layers=layers,
        placement=partition.placement, max_tp=partition.max_tp, num_experts=num_experts,
        forget_experts=expert_ids, moe_layers=moe_layers, max_ep=max_ep)
