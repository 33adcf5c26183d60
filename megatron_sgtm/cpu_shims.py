"""Make megatron-core 0.16.1 run on CPU-only machines (applied only when CUDA is absent).

megatron-core assumes a GPU in a few places:
- ``torch.cuda.current_device()`` as a default device for buffers (rotary tables, wgrad
  scratch) -> answer ``"cpu"``;
- the model-parallel RNG tracker forks the *CUDA* generator -> fork the CPU generator instead;
- ``torch.cuda.synchronize()`` in dist_checkpointing save paths -> a no-op;
- the pipeline schedules create their token counter with ``device="cuda"`` -> on the CPU;
- activation checkpointing saves and restores the CUDA generator next to the CPU one -> the
  CUDA part is an empty state (the CPU generator and the tracker are still restored);
- ``torch.cuda.is_available()``-style checks elsewhere are left alone.

Our attention is always causal through ``is_causal=True``, so megatron's default mask builder
is never needed.
"""
from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class _TorchWithCPUCounters:
    """``torch`` as megatron's pipeline schedules see it: tensors they create on "cuda" are
    created on the CPU (the schedules' only device literal is their token counter)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def zeros(self, *size, device=None, **kwargs):
        if device == "cuda":
            device = "cpu"
        return self._real.zeros(*size, device=device, **kwargs)


class CPURNGStatesTracker:
    """The model-parallel RNG tracker, on the CPU generator (same interface as megatron's)."""

    def __init__(self, *_args, **_kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def get_states(self):
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states):
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def apply_cpu_shims(force: bool = False) -> bool:
    """Install the shims once per process. Returns True when they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    mp_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    schedules.torch = _TorchWithCPUCounters(torch)
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _APPLIED = True
    return True
