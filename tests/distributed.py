"""In-process spawn of gloo process groups for distributed tests (no torchrun)."""
from __future__ import annotations

import io
import os
import socket
import sys
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        # Serialise to bytes: tensors sent through the queue would live in shared memory that
        # disappears when this worker exits.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report any failure to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if "megatron_sgtm.parallel" in sys.modules:  # else nothing of it to tear down (and
            from megatron_sgtm.parallel import destroy_parallel  # no megatron-core import)

            destroy_parallel()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 300):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return results
    by rank. ``fn`` must be importable (module level). Raises if any rank fails."""
    assert backend == "gloo", "CPU tests use gloo"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
            results[rank] = payload if status == "error" else torch.load(
                io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
