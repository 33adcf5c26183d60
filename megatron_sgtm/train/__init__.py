"""Pretraining: config, engines (megatron-core DDP / DeepSpeed ZeRO), the loop, the CLI.

Importing this package is cheap; megatron is imported by the modules that need it."""
from .config import ExperimentConfig, load_experiment
from .errors import NonFiniteLoss, TrainError

__all__ = ["ExperimentConfig", "load_experiment", "TrainError", "NonFiniteLoss"]
