"""Shard reading, label-homogeneous packing and training/held-out batches.

``open_split`` validates a data_prep split (all of its shards, as one dataset); ``TrainBatches`` serves resumable DP-sliced
micro-batches; ``EvalBatches`` serves held-out ones. ``testing.write_test_shards`` writes small
real shard directories for tests.
"""
from .batches import METHODS, EvalBatches, MethodSpec, TrainBatches, method_spec
from .packing import PackedIndex, build_packing, cached_packing
from .shards import DataError, ShardSplit, open_split, read_manifest

__all__ = ["DataError", "EvalBatches", "METHODS", "MethodSpec", "PackedIndex", "ShardSplit",
           "TrainBatches", "build_packing", "cached_packing", "method_spec", "open_split",
           "read_manifest"]
