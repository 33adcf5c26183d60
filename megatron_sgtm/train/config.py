"""The training run's typed config: the core (model/partition/routing/TP) plus data, optimizer,
checkpoint, logging and engine sections.

The YAML stays flat at the top: ``model``, ``partition``, ``routing``, ``tensor_parallel`` are
exactly ``CoreConfig``'s keys, so a checkpoint's stored config is readable by every command that
only needs the core. A ``base`` key (a path or list of paths, relative to the file) merges model
files such as ``configs/models/64m.yaml`` underneath.

``routing.method`` follows ``data.method`` (filters, SLUNG and conditional training route
nothing); leaving it out derives it, giving a different one is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional


from ..config import CoreConfig
from ..configbase import ConfigError, config_from_dict, deep_merge, parse_overrides, read_yaml

DataMethod = Literal["none", "sgtm", "gradient_routing", "activation_masking", "weak_filter",
                     "strict_filter", "slung", "conditional"]

# data.method -> the routing method the model must be built with.
ROUTING_OF = {
    "none": "none", "sgtm": "sgtm", "gradient_routing": "gradient_routing",
    "activation_masking": "activation_masking", "weak_filter": "none", "strict_filter": "none",
    "slung": "none", "conditional": "none",
}


@dataclass
class DataConfig:
    dir: str = ""
    split: str = "train"
    method: DataMethod = "sgtm"
    # Held-out splits evaluated every train.eval_every steps (missing optional splits skipped).
    eval_splits: list[str] = field(default_factory=lambda: ["test_retain", "test_forget",
                                                            "test_adjacent"])
    eval_batches: int = 4
    # SLUNG: drop flagged tokens' loss ("mask") or push them down ("unlikelihood").
    slung_mode: Literal["mask", "unlikelihood"] = "mask"

    def problems(self) -> list[str]:
        out = []
        if not self.dir:
            out.append("dir: required (a `sgtm prep` output directory)")
        if self.eval_batches < 0:
            out.append(f"eval_batches: must be >= 0, got {self.eval_batches}")
        return out


@dataclass
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = 4
    global_batch_size: int = 8
    steps: int = 100
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: evaluate only at the end
    log_every: int = 10
    # Intra-op threads per process on CPU; fixed so CPU runs are reproducible bit for bit.
    threads: int = 1
    # torch.compile the model. Unset: on with CUDA, off on CPU (where compiling a step takes
    # longer than a short CPU run saves).
    compile: Optional[bool] = None
    compile_backend: str = "inductor"
    # torch.compile's mode; "reduce-overhead" replays CUDA graphs (launch overhead matters for
    # small models), one graph per distinct forget-token count shape.
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune",
                                   "max-autotune-no-cudagraphs"]] = None

    def compile_on(self, cuda: bool) -> bool:
        return cuda if self.compile is None else self.compile

    def problems(self) -> list[str]:
        out = []
        for name in ("micro_batch_size", "global_batch_size", "steps", "log_every", "threads"):
            if getattr(self, name) <= 0:
                out.append(f"{name}: must be positive, got {getattr(self, name)}")
        if self.global_batch_size > 0 and self.micro_batch_size > 0 and \
                self.global_batch_size % self.micro_batch_size:
            out.append(f"global_batch_size {self.global_batch_size} is not a multiple of "
                       f"micro_batch_size {self.micro_batch_size}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            out.append(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.grad_clip < 0:
            out.append("warmup_steps, eval_every and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            out.append(f"betas: need two values in [0, 1), got {self.betas}")
        if self.compile_mode is not None and self.compile_backend != "inductor":
            out.append(f"compile_mode {self.compile_mode!r} applies to the inductor backend, "
                       f"not {self.compile_backend!r}")
        return out


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: no checkpoints
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: Literal["auto", "never", "require"] = "auto"
    # Load pickled objects from the checkpoint to resume even when they are not on the
    # allowlist (format-1 per-rank pickles, unknown classes): only for checkpoints whose origin
    # you trust. `sgtm train --trust-checkpoint` sets it. sha256 checks apply regardless.
    trust_pickle: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.save_every < 0:
            out.append(f"save_every: must be >= 0, got {self.save_every}")
        if self.keep_last <= 0:
            out.append(f"keep_last: must be positive, got {self.keep_last}")
        if self.resume == "require" and not self.dir:
            out.append("resume 'require' needs checkpoint.dir")
        return out


@dataclass
class LoggingConfig:
    run_dir: str = ""  # empty: checkpoint.dir, else no metrics file
    wandb: Literal["off", "offline", "online"] = "offline"
    project: str = "megatron-sgtm"
    run_name: str = ""
    progress_bar: bool = True


@dataclass
class EngineConfig:
    name: Literal["megatron", "deepspeed"] = "megatron"
    zero_stage: int = 1
    distributed_optimizer: bool = False
    # Start each gradient bucket's data-parallel reduction during the last micro-batch's
    # backward, as soon as the bucket is complete, instead of after the whole backward.
    overlap_grad_reduce: bool = True

    def problems(self) -> list[str]:
        out = []
        if self.zero_stage not in (1, 2):
            out.append(f"zero_stage: must be 1 or 2, got {self.zero_stage}")
        return out


# Signals a run may treat as "save and stop" (SIGKILL and SIGSTOP cannot be caught).
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass
class ResilienceConfig:
    """Preemption, hangs and concurrent writers (see megatron_sgtm/train/README.md)."""

    # On one of these signals every rank finishes its step, a checkpoint is saved and the run
    # exits 75; match `#SBATCH --signal=USR1@120`. Names with or without the SIG prefix.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Steps between the all-rank agreement to stop (one two-integer all-reduce per check).
    stop_check_every: int = 1
    # How long a launcher waits for its workers to finish the step and save before SIGKILL.
    stop_grace_s: float = 300.0
    # A rank with no training progress for this long ends the job with exit 4; 0: never.
    # It must exceed the slowest step, evaluation and checkpoint save (compiling included).
    hang_timeout_s: float = 1800.0
    # The checkpoint.dir lock: heartbeat period, and the heartbeat age after which a holder
    # on another host counts as dead (a holder on this host is checked by its PID).
    lock_heartbeat_s: float = 10.0
    lock_stale_s: float = 60.0

    def signal_names(self) -> list[str]:
        return [s.upper() if s.upper().startswith("SIG") else f"SIG{s.upper()}"
                for s in self.preempt_signals]

    def problems(self) -> list[str]:
        out = [f"preempt_signals: {name} cannot be used (choose from {', '.join(PREEMPT_SIGNALS)})"
               for name in self.signal_names() if name not in PREEMPT_SIGNALS]
        if self.stop_check_every <= 0:
            out.append(f"stop_check_every: must be positive, got {self.stop_check_every}")
        if self.stop_grace_s <= 0 or self.hang_timeout_s < 0:
            out.append("stop_grace_s must be > 0 and hang_timeout_s >= 0")
        if self.lock_heartbeat_s <= 0 or self.lock_stale_s < 2 * self.lock_heartbeat_s:
            out.append(f"need lock_heartbeat_s > 0 and lock_stale_s >= 2 x lock_heartbeat_s, got "
                       f"{self.lock_heartbeat_s} and {self.lock_stale_s}")
        return out


@dataclass
class ExperimentConfig(CoreConfig):
    """CoreConfig (model, partition, routing, tensor_parallel) plus how to train it."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)

    @property
    def core(self) -> CoreConfig:
        return CoreConfig(model=self.model, partition=self.partition, routing=self.routing,
                          tensor_parallel=self.tensor_parallel,
                          sequence_parallel=self.sequence_parallel,
                          pipeline_parallel=self.pipeline_parallel,
                          virtual_pipeline_parallel=self.virtual_pipeline_parallel,
                          expert_parallel=self.expert_parallel)

    @property
    def run_dir(self) -> str:
        return self.logging.run_dir or self.checkpoint.dir

    def problems(self) -> list[str]:
        out = super().problems()
        expected = ROUTING_OF[self.data.method]
        if self.routing.method != expected:
            out.append(f"routing.method {self.routing.method!r} disagrees with data.method "
                       f"{self.data.method!r} (which trains with routing {expected!r}); "
                       "leave routing.method out to derive it")
        if self.tensor_parallel > 0 and self.model.vocab_size % self.tensor_parallel:
            out.append(f"model.vocab_size {self.model.vocab_size} is not divisible by "
                       f"tensor_parallel {self.tensor_parallel} (pad the vocabulary)")
        if self.engine.name == "deepspeed" and self.engine.distributed_optimizer:
            out.append("engine.distributed_optimizer applies to the megatron engine; "
                       "DeepSpeed shards with zero_stage")
        if self.engine.name == "deepspeed" and (self.pipeline_parallel > 1 or
                                                self.sequence_parallel):
            out.append("engine.name deepspeed supports data x tensor parallelism only: "
                       "pipeline_parallel and sequence_parallel need engine.name megatron")
        if self.engine.name == "deepspeed" and self.model.moe is not None:
            out.append("engine.name deepspeed does not train MoE models here (its ZeRO "
                       "reduction knows no expert-parallel groups); use engine.name megatron")
        return out

    def batch_plan(self, world_size: int) -> tuple[int, int]:
        """(data-parallel size, gradient-accumulation steps) for ``world_size`` processes."""
        mp = self.model_parallel
        layout = f"tensor_parallel {self.tensor_parallel}" + (
            f" x pipeline_parallel {self.pipeline_parallel}" if self.pipeline_parallel > 1 else "")
        if world_size % mp:
            raise ConfigError([f"{world_size} processes are not divisible by {layout} = {mp}"])
        dp = world_size // mp
        if dp % self.expert_parallel:
            raise ConfigError([f"{world_size} processes at {layout} leave a data-parallel size "
                               f"{dp}, not divisible by expert_parallel {self.expert_parallel}"])
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError([f"train.global_batch_size {self.train.global_batch_size} is not a "
                               f"multiple of micro_batch_size x data-parallel size = {per_step} "
                               f"({world_size} processes at {layout})"])
        accum = self.train.global_batch_size // per_step
        if self.virtual_pipeline_parallel and accum % self.pipeline_parallel:
            raise ConfigError([f"the interleaved pipeline schedule needs the {accum} "
                               f"micro-batches per step to be a multiple of pipeline_parallel "
                               f"{self.pipeline_parallel}"])
        return dp, accum


def _with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError([f"{path}: 'base' includes form a cycle"])
    data = read_yaml(path)
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, _with_bases(path.parent / str(base), seen + (path,)))
    return deep_merge(merged, data)


def experiment_dict(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    data = _with_bases(Path(path)) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    method = (data.get("data") or {}).get("method", DataConfig.method) \
        if isinstance(data.get("data", {}), dict) else DataConfig.method
    routing = data.setdefault("routing", {})
    if isinstance(routing, dict) and "method" not in routing and method in ROUTING_OF:
        routing["method"] = ROUTING_OF[method]
    logging = data.get("logging")
    if isinstance(logging, dict) and logging.get("wandb") is False:
        logging["wandb"] = "off"  # YAML 1.1 reads a bare `off` as false
    return data


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML (with its bases) + ``key=value`` overrides -> a validated ``ExperimentConfig``."""
    return config_from_dict(ExperimentConfig, experiment_dict(path, overrides))


__all__ = ["ConfigError", "ExperimentConfig", "DataConfig", "TrainConfig", "CheckpointConfig",
           "LoggingConfig", "EngineConfig", "ResilienceConfig", "ROUTING_OF", "load_experiment", "experiment_dict"]
