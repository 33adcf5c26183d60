"""Training data: validated shard splits, label-homogeneous packing, resumable batches."""
from .batches import METHODS, TrainBatches, kept_documents
from .packing import SampleIndex, build_sample_index
from .shards import DataError, ShardSplit, open_split, read_manifest

__all__ = ["DataError", "METHODS", "SampleIndex", "ShardSplit", "TrainBatches",
           "build_sample_index", "kept_documents", "open_split", "read_manifest"]
