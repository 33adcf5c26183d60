"""Worker for tests/test_plan.py: measure a real built model's memory on CPU (spawned gloo ranks).

Each measurement builds the SGTM GPTModel and the training engine `sgtm train` uses on CPU
(megatron DDP + torch AdamW), then reads off: parameter bytes, DDP's gradient-buffer bytes,
Adam state bytes after one step, and the bytes autograd saved for backward during one forward
(every saved tensor's storage counted once; parameter storages excluded).
"""
from __future__ import annotations

import torch

# Two families covering every shape rule the planner has: MHA + GeLU + LayerNorm + learned
# positions + biases + tied embeddings, and GQA + SwiGLU + RMSNorm + RoPE, no biases, untied.
FAMILIES = {
    "gpt": dict(num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=256,
                vocab_size=2048, seq_length=64),
    "llama": dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                  ffn_hidden_size=192, vocab_size=2048, seq_length=64, activation="swiglu",
                  position_embedding="rope", normalization="RMSNorm", add_bias_linear=False,
                  tie_embeddings=False, output_bias=True),
}
MICRO_BATCH = 4
# Label-homogeneous sequences (as `sgtm train` packs them): forget, retain-path, unlabeled,
# forget.
SEQ_LABELS = [2, 1, 0, 2]


def experiment(family: str, tp: int, sp: bool = False, pp: int = 1, vp: int | None = None,
               num_layers: int | None = None):
    from megatron_sgtm.configbase import config_from_dict
    from megatron_sgtm.train.config import ExperimentConfig

    model = {**FAMILIES[family], "params_dtype": "fp32"}
    if num_layers is not None:
        model["num_layers"] = num_layers
    return config_from_dict(ExperimentConfig, {
        "model": model,
        "partition": {"forget_heads": 2, "forget_mlp_units": 8},
        "tensor_parallel": tp,
        "sequence_parallel": sp,
        "pipeline_parallel": pp,
        "virtual_pipeline_parallel": vp,
        "data": {"dir": "unused", "method": "sgtm"},
        "train": {"micro_batch_size": MICRO_BATCH, "global_batch_size": MICRO_BATCH * 2},
    })


def _saved_bytes(run, exclude: set[int]) -> int:
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return sum(storages.values()), out


def measure(family: str, tp: int, sp: bool) -> dict:
    from megatron_sgtm.model import build_model
    from megatron_sgtm.routing import route
    from megatron_sgtm.train.engine import build_engine

    cfg = experiment(family, tp, sp)
    torch.manual_seed(0)
    model = build_model(cfg.core)
    engine = build_engine(model, cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    s, b = cfg.model.seq_length, MICRO_BATCH
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=gen)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(s).expand(b, s).contiguous()  # as train.batches builds them
    labels = torch.tensor(SEQ_LABELS).unsqueeze(1).expand(b, s).contiguous()

    from megatron.core import parallel_state

    # Under sequence parallelism norms and the embedding hook read this rank's slice.
    shard = (parallel_state.get_tensor_model_parallel_rank(), tp) if sp else None

    def forward(use_spans: bool, token_labels: torch.Tensor):
        def run():
            with route(token_labels, use_spans=use_spans, sequence_shard=shard):
                return engine.module(inputs, positions, None, labels=targets)
        return run

    # Per-token labels mixed inside sequences take the per-token masking path, which saves
    # int64 token indices as well.
    mixed = torch.randint(0, 3, (b, s), generator=gen)
    saved_mixed, _ = _saved_bytes(forward(False, mixed), params)
    saved, token_loss = _saved_bytes(forward(True, labels), params)
    engine.zero_grad()
    token_loss.mean().backward()
    for module in engine.modules:   # DDP's data-parallel reduction of the gradient buffers
        module.finish_grad_sync()
    engine.step(1e-3)
    optimizer_state = sum(t.numel() * t.element_size() for state in engine.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grad_bytes": sum(buf.grad_data.numel() * buf.grad_data.element_size()
                          for module in engine.modules
                          for buf in module.buffers + module.expert_parallel_buffers),
        "optimizer_bytes": optimizer_state,
        "saved_bytes": saved,
        "saved_bytes_per_token_labels": saved_mixed,
    }


# Pipeline layouts whose per-stage parameters are counted: (family, PP, VP, layers).
PIPELINES = [("gpt", 2, None, 2), ("llama", 2, None, 2), ("gpt", 2, 2, 4)]


def stage_parameters(family: str, pp: int, vp: int | None, num_layers: int) -> int:
    """Parameters this rank's model chunks hold (its pipeline stage)."""
    from megatron_sgtm.model import build_model_chunks

    cfg = experiment(family, 1, pp=pp, vp=vp, num_layers=num_layers)
    return sum(p.numel() for chunk in build_model_chunks(cfg.core) for p in chunk.parameters())


def measure_all(rank: int, world_size: int) -> dict:
    """TP = world_size without and with sequence parallelism, then TP = 1 (data-parallel over
    the same ranks); then each pipeline layout's parameters on this rank's stage."""
    from megatron.core import parallel_state

    from megatron_sgtm.parallel import init_parallel

    out = {}
    for tp in sorted({world_size, 1}, reverse=True):
        init_parallel(tp, seed=1234)
        for family in FAMILIES:
            for sp in ((False, True) if tp > 1 else (False,)):
                out[(family, tp, sp)] = measure(family, tp, sp)
        parallel_state.destroy_model_parallel()
    for family, pp, vp, num_layers in PIPELINES:
        init_parallel(1, seed=1234, pipeline_parallel=pp, virtual_pipeline_parallel=vp)
        out[("stage", family, pp, vp)] = (parallel_state.get_pipeline_model_parallel_rank(),
                                          stage_parameters(family, pp, vp, num_layers))
        parallel_state.destroy_model_parallel()
    return out
