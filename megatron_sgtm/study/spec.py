"""Sweep specs: model sizes x token budgets x methods x undiscovered rates x seeds.

A spec expands into a flat, deterministic list of ``RunSpec``s. The order is the task index
a SLURM array uses, so it must not depend on anything but the spec itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from ..configbase import ConfigError, load_config
from .methods import (ABLATED, BASE_METHODS, LABEL_FREE, ROUTING_METHOD, MethodSpec, StudyMethod,
                      entry_problems, resolve)
from .paths import resolve_spec_paths

__all__ = ["ABLATED", "BASE_METHODS", "LABEL_FREE", "ROUTING_METHOD", "MethodSpec", "RunSpec",
           "SizeSpec", "StudyMethod", "StudySpec", "entry_of", "expand", "load_spec", "method_entries",
           "size_by_name"]


@dataclass
class SizeSpec:
    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    # Forget attention units: heads, or whole query groups under grouped-query attention.
    forget_heads: int = 1
    forget_mlp_units: int = 16
    # This size's token budgets (None: the spec's token_budgets / tokens_per_param).
    tokens: Optional[list[int]] = None
    # Architecture (megatron_sgtm.config.ModelConfig; these defaults are its own).
    num_query_groups: Optional[int] = None
    activation: Literal["gelu", "swiglu"] = "gelu"
    position_embedding: Literal["learned", "rope"] = "learned"
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    tie_embeddings: bool = True
    add_bias_linear: bool = True
    # Processes (GPUs) per run of this size. 1: the in-process single-rank trainer; more:
    # `sgtm train` under torchrun with this tensor parallelism (the rest data parallel).
    gpus: int = 1
    tensor_parallel: int = 1

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def model_config(self, vocab: int, seq_length: int):
        from ..config import ModelConfig

        return ModelConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size, activation=self.activation,
            position_embedding=self.position_embedding, normalization=self.normalization,
            tie_embeddings=self.tie_embeddings, add_bias_linear=self.add_bias_linear,
            vocab_size=vocab, seq_length=seq_length)

    def unit_problems(self, forget_heads: int, forget_mlp_units: int,
                      layers: Optional[list[int]] = None) -> list[str]:
        """Why a partition with these forget units does not fit this size ([] if it does)."""
        out = []
        if forget_heads >= self.query_groups:
            unit = "query groups" if self.num_query_groups else "heads"
            out.append(f"forget_heads {forget_heads} leaves no retain attention unit in size "
                       f"{self.name} ({self.query_groups} {unit})")
        if forget_mlp_units >= self.ffn_hidden_size:
            out.append(f"forget_mlp_units {forget_mlp_units} leaves no retain MLP unit in size "
                       f"{self.name} (ffn_hidden_size {self.ffn_hidden_size})")
        bad = [i for i in layers or [] if not 0 <= i < self.num_layers]
        if bad:
            out.append(f"layers {bad} outside 0..{self.num_layers - 1} of size {self.name}")
        return out

    def problems(self) -> list[str]:
        out = [f"size {self.name}: {p}" for p in self.model_config(2, 2).problems()]
        if out:
            return out
        if self.gpus < 1 or self.tensor_parallel < 1 or self.gpus % self.tensor_parallel:
            return [f"gpus {self.gpus} must be a positive multiple of tensor_parallel "
                    f"{self.tensor_parallel} (size {self.name})"]
        out = self.unit_problems(self.forget_heads, self.forget_mlp_units)
        if not out and self.tensor_parallel > 1:
            # The forget units must split evenly over the TP ranks (`sgtm train` checks it too,
            # but only once the run starts).
            from ..config import CoreConfig, PartitionConfig, RoutingConfig

            core = CoreConfig(model=self.model_config(2, 2), routing=RoutingConfig(method="sgtm"),
                              partition=PartitionConfig(forget_heads=self.forget_heads,
                                                        forget_mlp_units=self.forget_mlp_units),
                              tensor_parallel=self.tensor_parallel)
            out = [f"tensor_parallel {self.tensor_parallel} (size {self.name}): {p}"
                   for p in core.problems()]
        return out


@dataclass
class TrainSpec:
    seq_length: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Test-loss points recorded during training (for the loss curves).
    curve_points: int = 8
    curve_eval_sequences: int = 8
    threads: int = 1
    # Sequences per forward/backward (None: the whole batch); the batch accumulates them.
    micro_batch_size: Optional[int] = None
    # Cap on optimizer steps per run (None: the budget decides). For smoke runs of a large
    # spec on a small machine; a capped run does not train its budget.
    max_steps: Optional[int] = None

    def steps_for(self, tokens: int) -> int:
        steps = max(1, tokens // (self.seq_length * self.batch_size))
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def problems(self) -> list[str]:
        out = []
        for name in ("seq_length", "batch_size", "threads", "curve_points"):
            if getattr(self, name) <= 0:
                out.append(f"{name}: must be positive")
        if self.max_steps is not None and self.max_steps <= 0:
            out.append("max_steps: must be positive (or null)")
        micro = self.micro_batch_size
        if micro is not None and (micro <= 0 or self.batch_size % micro):
            out.append(f"micro_batch_size {micro} must divide batch_size {self.batch_size}")
        if not 0 <= self.warmup_fraction < 1:
            out.append("warmup_fraction: must be in [0, 1)")
        return out


@dataclass
class EvalSpec:
    # Held-out sequences per split for the final losses (None: the whole split).
    max_sequences: Optional[int] = 200
    calibration_steps: int = 100
    calibration_lr: float = 1e-2
    calibration_alpha: float = 100.0
    calibration_beta: float = 100.0
    calibration_batch: int = 16
    # Generation-based capability rate: continuations of forget-domain prompts.
    generation_prompts: int = 32
    prompt_tokens: int = 8
    generation_tokens: int = 24
    temperature: float = 1.0
    # lm-evaluation-harness tasks run on each run's HF export (the optional extra 'eval'):
    # local ones (`sgtm eval-tasks` names, e.g. sgtm_forget_mc, built from the held-out
    # splits) or hub ones (wmdp_bio, mmlu; need network). Empty: off.
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = None


@dataclass
class AttackSpec:
    """Adversarial fine-tuning of the ablated model on a 50/50 forget/retain mix."""

    enabled: bool = False
    methods: list[str] = field(default_factory=lambda: ["sgtm", "weak_filter"])
    steps: int = 100
    lr: float = 2e-4
    warmup_steps: int = 10
    batch_size: int = 8
    eval_every: int = 10
    eval_sequences: int = 32

    def problems(self) -> list[str]:
        out = []
        if self.steps <= 0 or self.eval_every <= 0 or self.batch_size < 2:
            out.append("steps: steps and eval_every must be positive, batch_size >= 2")
        if not 0 <= self.warmup_steps < self.steps:
            out.append(f"warmup_steps: must be in [0, steps={self.steps}), got {self.warmup_steps}")
        return out


@dataclass
class LeakageSpec:
    """No-filter baselines on all retain data plus a share of the forget documents."""

    forget_shares: list[float] = field(default_factory=list)
    # Size/budget/seed of the series (None: the first of each in the spec).
    size: Optional[str] = None
    tokens: Optional[int] = None
    # One series at each of these sizes instead of one `size` (leakage against model size).
    sizes: Optional[list[str]] = None
    # Which of a size's budgets its series trains at when `tokens` is unset (-1: the largest).
    budget_index: int = 0

    def series_sizes(self, spec_sizes: list[str]) -> list[str]:
        if self.sizes is not None:
            return list(self.sizes)
        return [self.size or spec_sizes[0]]


@dataclass
class StudySpec:
    name: str = "study"
    recipe: str = "configs/data/bilingual.yaml"
    data_overrides: list[str] = field(default_factory=list)
    sizes: list[SizeSpec] = field(default_factory=lambda: [SizeSpec()])
    token_budgets: list[int] = field(default_factory=lambda: [200_000])
    # Optional: budgets as tokens per parameter (Chinchilla-style). Replaces token_budgets.
    tokens_per_param: Optional[float] = None
    # A list of base methods, or a mapping of entry name -> MethodSpec (study/README.md).
    methods: Union[list[StudyMethod], dict[str, MethodSpec]] = field(
        default_factory=lambda: ["no_filter", "sgtm"])
    undiscovered_rates: list[float] = field(default_factory=lambda: [0.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    retain_mode_share: Optional[float] = None
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    attack: AttackSpec = field(default_factory=AttackSpec)
    leakage: LeakageSpec = field(default_factory=LeakageSpec)

    def problems(self) -> list[str]:
        out = []
        if not self.sizes:
            out.append("sizes: at least one")
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            out.append(f"sizes: duplicate names {names}")
        if not self.methods or not self.seeds:
            out.append("methods and seeds: at least one each")
        for r in self.undiscovered_rates:
            if not 0.0 <= r <= 1.0:
                out.append(f"undiscovered_rates: {r} is not in [0, 1]")
        if any(b <= 0 for b in self.token_budgets):
            out.append("token_budgets: must be positive")
        for s in self.leakage.forget_shares:
            if not 0.0 <= s <= 1.0:
                out.append(f"leakage.forget_shares: {s} is not in [0, 1]")
        if self.leakage.size is not None and self.leakage.size not in names:
            out.append(f"leakage.size {self.leakage.size!r} is not one of {names}")
        if self.leakage.sizes is not None:
            if self.leakage.size is not None:
                out.append("leakage.size and leakage.sizes: set one, not both")
            for name in self.leakage.sizes:
                if name not in names:
                    out.append(f"leakage.sizes: {name!r} is not one of {names}")
        for size in self.sizes:
            dp = size.gpus // max(1, size.tensor_parallel)
            micro = self.train.micro_batch_size or max(1, self.train.batch_size // dp)
            if size.gpus > 1 and self.train.batch_size % (micro * dp):
                out.append(f"train.batch_size {self.train.batch_size} is not a multiple of "
                           f"micro_batch_size {micro} x the {dp} data-parallel ranks of size "
                           f"{size.name}")
            if size.gpus > 1 and self.leakage.forget_shares and \
                    size.name in self.leakage.series_sizes(names):
                out.append(f"leakage: the baseline series trains in-process, one device; size "
                           f"{size.name} has gpus {size.gpus} (pick another leakage size)")
            n = len(size.tokens) if size.tokens else (1 if self.tokens_per_param is not None
                                                      else len(self.token_budgets))
            if (self.leakage.forget_shares and self.leakage.tokens is None
                    and size.name in self.leakage.series_sizes(names)
                    and not -n <= self.leakage.budget_index < n):
                out.append(f"leakage.budget_index {self.leakage.budget_index} is outside the "
                           f"{n} budget(s) of size {size.name}")
        out += entry_problems(self.methods)
        for name, entry in method_entries(self).items():
            if entry.moe is not None:  # the whole MoE config, checked on every size
                from .engine import core_config

                for size in self.sizes:
                    out += [f"methods.{name} (size {size.name}): {p}"
                            for p in core_config(size, 64, 8, entry).problems()]
                continue
            overrides = (entry.forget_heads, entry.forget_mlp_units, entry.layers)
            if entry.routing_method == "none" or overrides == (None, None, None):
                continue  # the sizes' own units were checked with the sizes
            for size in self.sizes:
                heads = 0 if entry.variant == "joint_attention" else (
                    size.forget_heads if entry.forget_heads is None else entry.forget_heads)
                mlp = size.forget_mlp_units if entry.forget_mlp_units is None else entry.forget_mlp_units
                out += [f"methods.{name}: {p}" for p in size.unit_problems(heads, mlp, entry.layers)]
        known = set(BASE_METHODS) | set(method_entries(self))
        for m in self.attack.methods:
            if m not in known:
                out.append(f"attack.methods: {m!r} is neither a method entry nor a base method")
        return out


@dataclass(frozen=True)
class RunSpec:
    """One training run and its evaluation."""

    kind: str  # "main" or "leakage"
    size: str
    tokens: int
    method: str
    rate: Optional[float]  # undiscovered rate of the labels it trains on; None: label-free
    seed: int
    forget_share: Optional[float] = None  # leakage baselines only
    # The study method behind the entry ``method`` names (the same for a base method).
    base_method: str = ""

    def __post_init__(self):
        if not self.base_method:
            object.__setattr__(self, "base_method", self.method)

    @property
    def run_id(self) -> str:
        rate = "na" if self.rate is None else f"{self.rate:g}"
        base = f"{self.size}-{_short(self.tokens)}-{self.method}-u{rate}-s{self.seed}"
        if self.kind == "leakage":
            base = f"leak-{self.size}-{_short(self.tokens)}-f{self.forget_share:g}-s{self.seed}"
        return base

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "run_id": self.run_id}


def _short(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % (div // 10 or 1) == 0:
            return f"{n / div:g}{unit}"
    return str(n)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """A spec file plus overrides; relative paths resolve against the spec's folder, then
    the project root (never the working directory)."""
    return resolve_spec_paths(load_config(StudySpec, path, overrides), Path(path))


def method_entries(spec: StudySpec) -> dict[str, MethodSpec]:
    """Entry name -> its settings, base ``method`` filled in, in spec order."""
    return resolve(spec.methods)


def entry_of(spec: StudySpec, run: RunSpec) -> MethodSpec:
    """The method settings a run trains with (leakage baselines: plain no_filter)."""
    if run.kind == "leakage":
        return MethodSpec(method="no_filter")
    return method_entries(spec)[run.method]


def size_by_name(spec: StudySpec, name: str) -> SizeSpec:
    for s in spec.sizes:
        if s.name == name:
            return s
    raise ConfigError([f"no size named {name!r}"])


def budgets_for(spec: StudySpec, size: SizeSpec, vocab: int) -> list[int]:
    if size.tokens:
        return list(size.tokens)
    if spec.tokens_per_param is None:
        return list(spec.token_budgets)
    from .compute import param_count

    return [int(spec.tokens_per_param * param_count(size, vocab, spec.train.seq_length)["total"])]


def expand(spec: StudySpec, vocab: int) -> list[RunSpec]:
    """Every run of the spec, in task-index order (main grid first, then leakage series)."""
    runs: list[RunSpec] = []
    for size in spec.sizes:
        for tokens in budgets_for(spec, size, vocab):
            for seed in spec.seeds:
                for name, entry in method_entries(spec).items():
                    rates = [None] if entry.base in LABEL_FREE else spec.undiscovered_rates
                    for rate in rates:
                        runs.append(RunSpec("main", size.name, tokens, name, rate, seed,
                                            base_method=entry.base))
    leak = spec.leakage
    if leak.forget_shares:
        for name in leak.series_sizes([s.name for s in spec.sizes]):
            size = size_by_name(spec, name)
            tokens = leak.tokens or budgets_for(spec, size, vocab)[leak.budget_index]
            for seed in spec.seeds[:1]:
                for share in leak.forget_shares:
                    runs.append(RunSpec("leakage", size.name, tokens, "no_filter", None, seed, share))
    return runs
