"""Atomic, resharding checkpoints: model + optimizer through megatron dist_checkpointing,
per-rank extra state and RNG without pickle, partition metadata checked before anything is
loaded, sha256 of every file verified and third-party pickles vetted before they are read."""
from .io import (check_compatible, load_checkpoint, model_shapes, restore_rng_state, rng_state,
                 save_checkpoint)
from .layout import (CheckpointError, complete_checkpoints, latest_checkpoint, read_metadata,
                     resolve)
from .verify import verify_checkpoint

__all__ = ["CheckpointError", "check_compatible", "complete_checkpoints", "latest_checkpoint",
           "load_checkpoint", "model_shapes", "read_metadata", "resolve", "restore_rng_state",
           "rng_state", "save_checkpoint", "verify_checkpoint"]
