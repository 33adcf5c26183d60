"""The CPU shims: megatron-core's CUDA assumptions answered on a CPU-only machine."""
from __future__ import annotations

from distributed import run_distributed


def _shim_worker(rank, world):
    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_sgtm.cpu_shims import apply_cpu_shims
    from megatron_sgtm.parallel import init_parallel

    assert not torch.cuda.is_available()
    assert apply_cpu_shims() is True
    init_parallel(1, seed=5)
    out = {"device": torch.cuda.current_device()}
    torch.cuda.synchronize()  # would raise without the shim
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        forked_first = torch.rand(3)
    with tracker.fork():
        forked_second = torch.rand(3)
    out["outer_state_restored"] = torch.equal(before, torch.get_rng_state())
    out["fork_advances"] = not torch.equal(forked_first, forked_second)
    init_parallel(1, seed=5)  # reseeding reproduces the forked stream
    with get_cuda_rng_tracker().fork():
        out["reproducible"] = torch.equal(torch.rand(3), forked_first)
    from megatron.core.pipeline_parallel import schedules

    # The schedules' token counter (device="cuda" in megatron's source) lands on the CPU.
    out["counter_device"] = str(schedules.torch.zeros([], dtype=torch.int, device="cuda").device)
    out["schedules_torch_forwards"] = schedules.torch.float32 is torch.float32
    return out


def test_cpu_shims_make_megatron_cpu_safe():
    out = run_distributed(_shim_worker, 1)[0]
    assert out["device"] == "cpu"
    assert out["outer_state_restored"] and out["fork_advances"] and out["reproducible"]
    assert out["counter_device"] == "cpu" and out["schedules_torch_forwards"]
