"""Workers for the expert-parallel layout proofs (spawned gloo processes).

Every layout trains one optimizer step's worth of micro-batches through the real engine
(megatron DDP with its expert-parallel buckets, megatron-core's schedule, finalize_model_grads)
from the same full (TP 1, EP 1) weights, and returns its gradients gathered into the full
layout under global expert ids. Data-parallel rank d trains micro-batches d, d + DP, ...; the
single process trains all of them. The micro-batches carry deliberately different label mixes,
so an EP rank's forget-only micro-batch is dispatched together with another rank's retain-only
or unlabeled one.
"""
from __future__ import annotations

import torch

from _workers_moe import FAMILIES, MODES, gather, initial_state, load_state, overrides, world_ep

COMMON = ["data.dir=unused", "train.micro_batch_size=4", "train.global_batch_size=24",
          "model.params_dtype=fp32", "train.seed=3"]
# Per micro-batch, the labels of its 4 sequences.
MIXES = [[2, 2, 2, 2], [1, 1, 1, 1], [2, 1, 0, 0], [0, 0, 0, 0], [0, 2, 1, 2], [1, 0, 0, 2]]
FORGET_ONLY = [[2, 2, 2, 2]] * 6
# name -> (world size, tensor_parallel, expert_parallel)
LAYOUTS = {"ep1": (1, 1, 1), "ep2": (2, 1, 2), "tp2_ep2": (4, 2, 2)}


def micro_batches(mixes):
    from _workers_pipeline import micro_batches as batches

    return batches(mixes, seq=8, vocab=96)


def experiment(family: str, layout: str, mode: str):
    from megatron_sgtm.train.config import load_experiment

    _world, tp, ep = LAYOUTS[layout]
    return load_experiment(None, COMMON + overrides(family, mode, tp=tp, ep=ep) +
                           ["data.method=sgtm"])


def _init(cfg) -> None:
    from megatron.core import parallel_state as ps

    from megatron_sgtm.parallel import init_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_parallel(cfg.tensor_parallel, cfg.train.seed, expert_parallel=cfg.expert_parallel)


def step(family: str, layout: str, mode: str, full: dict, mixes) -> dict:
    """One engine step: mean loss over DP, gathered gradients, global and partition norms."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from _workers_moe import reset_aux_scale
    from megatron_sgtm.model import build_model_chunks
    from megatron_sgtm.train.batches import InputBuilder
    from megatron_sgtm.train.engine import build_engine
    from megatron_sgtm.train.grads import PartitionNorms, grad_of, total_grad_norm
    from megatron_sgtm.train.loop import accumulate_grads

    cfg = experiment(family, layout, mode)
    _init(cfg)
    chunks = build_model_chunks(cfg.core)
    load_state(chunks[0], full, cfg.core)
    engine = build_engine(chunks, cfg)
    reset_aux_scale()
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = micro_batches(mixes)[dp_rank::dp]
    loss = accumulate_grads(engine, InputBuilder(cfg, torch.device("cpu")), mine,
                            torch.device("cpu")).detach()
    if dp > 1:
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
    grads = gather({n: grad_of(p).detach() for n, p in chunks[0].named_parameters()}, cfg.core)
    return {"loss": float(loss) / dp, "grads": grads,
            "norm": float(total_grad_norm(engine.params)),
            "partition_norms": PartitionNorms(chunks, cfg.routing).squared().tolist(),
            "engine": engine}


CASES = [(mode, mixes) for mode in MODES for mixes in (MIXES, FORGET_ONLY)]


def run_steps(layout: str, families, states: dict) -> dict:
    out = {}
    for family in families:
        for mode, mixes in CASES:
            result = step(family, layout, mode, states[family], mixes)
            result.pop("engine")
            out[(family, mode, str(mixes))] = result
    return out


def expert_init(family: str, tp: int = 1, ep: int = 1) -> dict:
    """The routed experts a freshly built model starts with (seed 11), full layout."""
    from _workers_moe import core_config
    from megatron_sgtm.model import build_model

    core = core_config(family, tp=tp, ep=ep)
    torch.manual_seed(11)
    model = build_model(core)
    named = {n: p.detach() for n, p in model.named_parameters() if ".local_experts." in n}
    return gather(named, core)


def save_checkpoint(family: str, full: dict, path: str) -> dict:
    """A checkpoint of the model after one EP 2 step and an update (so it differs from
    ``full``), saved at its own layout; returns its parameters in the full layout."""
    from megatron_sgtm.checkpoint import save_checkpoint as save
    from megatron_sgtm.configbase import config_to_dict
    from megatron_sgtm.partition import build_partition

    result = step(family, "ep2", "learned", full, MIXES)
    engine, cfg = result["engine"], experiment(family, "ep2", "learned")
    engine.step(1e-2)
    save(path, 1, engine.model[0], None, {}, config_to_dict(cfg),
         build_partition(cfg.model, cfg.partition, cfg.routing).to_metadata(), keep_last=None)
    return gather({n: p.detach() for n, p in engine.model[0].named_parameters()}, cfg.core)


def world_two(rank, world, states, checkpoint_dir):
    """EP 2: the engine steps; the public-API invariance and isolation; a checkpoint saved at
    EP 2 and read back by the post-training loader at EP 1 (DP 2)."""
    from megatron_sgtm.checkpoint import latest_checkpoint
    from megatron_sgtm.parallel import init_parallel
    from megatron_sgtm.post import ckpt_io

    out = {"steps": run_steps("ep2", FAMILIES, states)}
    out["saved"] = save_checkpoint("swiglu_shared", states["swiglu_shared"], checkpoint_dir)
    out.update(world_ep(rank, world, states, ep=2))
    out["plan"] = {family: plan_check(family, "ep2") for family in FAMILIES}
    out["init"] = {family: expert_init(family, ep=2) for family in FAMILIES}
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    init_parallel(1, seed=0)
    model, _core, _meta = ckpt_io.load(latest_checkpoint(checkpoint_dir), 1)
    out["loaded"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out if rank == 0 else None


def world_one(rank, world):
    """The full weights and the single-process reference steps."""
    from megatron_sgtm.parallel import init_parallel

    init_parallel(1, seed=0)
    states = {family: initial_state(family) for family in FAMILIES}
    return {"states": states, "steps": run_steps("ep1", FAMILIES, states),
            "plan": {family: plan_check(family, "ep1") for family in FAMILIES},
            "init": {family: expert_init(family) for family in FAMILIES}}


def world_four(rank, world, states):
    """TP 2 x EP 2 with sequence parallelism (4 processes)."""
    out = run_steps("tp2_ep2", ["swiglu_shared"], states)
    out["init"] = expert_init("swiglu_shared", tp=2, ep=2)
    return out if rank == 0 else None


def plan_check(family: str, layout: str) -> dict:
    """This rank's real parameters and saved activation bytes (one forward of
    label-homogeneous sequences through the engine's module) next to ``sgtm plan``'s."""
    from _workers_plan import _saved_bytes
    from megatron_sgtm.model import build_model_chunks
    from megatron_sgtm.plan import Layout, plan_stage
    from megatron_sgtm.routing import route
    from megatron_sgtm.train.engine import build_engine

    cfg = experiment(family, layout, "learned")
    _init(cfg)
    (model,) = build_model_chunks(cfg.core)
    engine = build_engine([model], cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    (batch,) = micro_batches([[2, 1, 0, 2]])
    pos = torch.arange(batch["tokens"].shape[1]).expand_as(batch["tokens"]).contiguous()

    def run():
        with route(batch["routing_labels"]):
            return engine.module(batch["tokens"], pos, None, labels=batch["targets"])

    saved, _ = _saved_bytes(run, params)
    world = LAYOUTS[layout][0]
    stage = plan_stage(cfg.model, Layout.of(cfg, world), 0)
    from megatron_sgtm.plan_moe import dispatcher_bytes

    return {"params": sum(p.numel() for p in model.parameters()), "plan_params": stage.params,
            "saved": saved, "plan_saved": stage.activations + stage.extras -
            dispatcher_bytes(cfg.model, Layout.of(cfg, world))}
