"""megatron_sgtm: Selective Gradient Masking (SGTM) pretraining on megatron-core.

The light-weight pieces (configs, partition math, routing context) import without
megatron-core; the model builder lives in ``megatron_sgtm.model``.
"""
import warnings as _warnings

# megatron-core warns on every import that the optional GPU extras are absent, and torch's
# checkpoint planner warns about its own deprecations; none of it is actionable for a user.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated", "Please use DTensor instead",
                 "`load_state_dict` is deprecated"):
    _warnings.filterwarnings("ignore", message=f".*{_message}")

from .config import CoreConfig, ModelConfig, PartitionConfig, RoutingConfig  # noqa: E402
from .configbase import ConfigError, load_config  # noqa: E402
from .partition import Partition, PartitionError, build_partition  # noqa: E402
from .routing import FORGET, RETAIN, UNLABELED, route  # noqa: E402

__all__ = [
    "ConfigError", "CoreConfig", "FORGET", "ModelConfig", "Partition", "PartitionConfig",
    "PartitionError", "RETAIN", "RoutingConfig", "UNLABELED", "build_partition", "load_config",
    "route",
]
