"""megatron_sgtm: Selective Gradient Masking (SGTM) pretraining on megatron-core.

The light-weight pieces (configs, partition math, routing context) import without
megatron-core; the model builder lives in ``megatron_sgtm.model``.
"""
from .config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig
from .configbase import ConfigError, load_config
from .partition import Partition, PartitionError, build_partition
from .routing import FORGET, RETAIN, UNLABELED, route

__all__ = [
    "ConfigError", "CoreConfig", "FORGET", "ModelConfig", "Partition", "PartitionConfig",
    "PartitionError", "RETAIN", "RoutingConfig", "UNLABELED", "build_partition", "load_config",
    "route",
]
