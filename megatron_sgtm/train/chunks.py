"""This rank's model chunks as one module: what the optimizer, the gradient norms and the
checkpoint see.

Without pipeline parallelism there is one chunk, the whole model; with it, this stage's
layers, one chunk per virtual stage under the interleaved schedule. Checkpoint keys come from
each chunk's own sharded state dict, where megatron numbers layers globally, so a checkpoint
written at one (TP, PP, VP) layout loads into any other.
"""
from __future__ import annotations

import torch


class ModelChunks(torch.nn.ModuleList):
    @classmethod
    def of(cls, model_or_chunks) -> "ModelChunks":
        if isinstance(model_or_chunks, cls):
            return model_or_chunks
        if isinstance(model_or_chunks, (list, tuple)):
            return cls(model_or_chunks)
        return cls([model_or_chunks])

    @property
    def partition(self):
        return self[0].partition

    @property
    def config(self):
        return self[0].config

    def sharded_state_dict(self) -> dict:
        if len(self) == 1:
            return self[0].sharded_state_dict()
        return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(self)}

    def load_state_dict(self, state_dict, strict: bool = True):
        if len(self) == 1:
            return self[0].load_state_dict(state_dict, strict=strict)
        for i, chunk in enumerate(self):
            chunk.load_state_dict(state_dict[f"chunk{i}"], strict=strict)
        return None
