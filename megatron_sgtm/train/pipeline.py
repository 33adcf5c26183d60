"""One optimizer step's forwards and backwards, and held-out forwards, micro-batch by micro-batch.

The megatron engine runs them through megatron-core's schedules (``get_forward_backward_func``:
no pipelining, 1F1B, or the interleaved schedule with virtual stages), which also reduce the
gradients at the end (``finalize_model_grads``: data-parallel reduction, the TP sum of
sequence-parallel norm/bias gradients, the sum of the two copies of tied embeddings split over
pipeline stages). DeepSpeed runs the plain loop below (data x tensor parallelism only).

Routing under a pipeline: every stage is fed the same micro-batch stream, so a stage without
the embedding still has each micro-batch's labels to route its own layers. Each micro-batch's
forward runs inside its own routing (entered in ``forward_step``), and the masking functions
capture at forward time what their backward needs, so a backward that runs after later
micro-batches' forwards (1F1B, interleaved) still masks with its own labels.

Dropout keys: each micro-batch's forward also runs with its sequences' global positions in
the data order (``dropout.keyed``), from which hidden-dropout masks are drawn.

Loss convention (as megatron's): every micro-batch contributes the mean over its positions
divided by the number of micro-batches; the loss value lives on the last stage only.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps

from ..dropout import keyed
from ..routing import route
from .batches import InputBuilder, ModelInputs


def sequence_shard(sequence_parallel: bool) -> Optional[tuple[int, int]]:
    """(TP rank, TP size) when the model shards the sequence over TP, else None."""
    if not sequence_parallel:
        return None
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _forward(model, inputs: ModelInputs, device, shard):
    with route(inputs.routing_labels, device=device, sequence_shard=shard), \
            keyed(inputs.sample_positions, inputs.tokens.shape[1], shard):
        return model(inputs.tokens, inputs.position_ids, None, labels=inputs.targets)


class ScheduledSteps:
    """Forward/backward of a step's micro-batches through megatron-core's schedules.

    ``modules``: this rank's DDP-wrapped model chunks (one per virtual stage)."""

    def __init__(self, modules: list, seq_length: int, micro_batch_size: int,
                 sequence_parallel: bool) -> None:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.modules = modules
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.shard = sequence_shard(sequence_parallel)
        self.schedule = get_forward_backward_func()
        config = modules[0].config
        # Earlier micro-batches accumulate without the data-parallel reduction; the schedule
        # reduces everything once at the end of the step.
        config.no_sync_func = ([m.no_sync for m in modules] if len(modules) > 1
                               else modules[0].no_sync)
        config.finalize_model_grads_func = finalize_model_grads
        self.config = config

    def _run(self, inputs: list[ModelInputs], loss_fn: Callable, device, forward_only: bool):
        def forward_step(data_iterator, model):
            item = next(data_iterator)
            return _forward(model, item, device, self.shard), partial(loss_fn, item)

        iterators = [iter(inputs) for _ in self.modules]
        return self.schedule(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.modules if len(self.modules) > 1 else self.modules[0],
            num_microbatches=len(inputs), seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size, forward_only=forward_only)

    def forward_backward(self, builder: InputBuilder, micro_batches: list[dict],
                         device) -> torch.Tensor:
        """This rank's step loss, still on the device (zero off the last stage)."""
        inputs = [builder(batch) for batch in micro_batches]

        def loss_fn(item, token_loss):
            loss = builder.loss(token_loss, item)
            # A copy: the schedule divides the returned loss by the micro-batch count in place.
            return loss, {"loss": loss.detach().clone()}

        outputs = self._run(inputs, loss_fn, device, forward_only=False)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for out in outputs:
            total += out["loss"].float()
        return total / len(inputs)

    def forward_only(self, builder: InputBuilder, batches: list[dict], device) -> torch.Tensor:
        """``[sum of token losses, token count]`` over ``batches`` (zero off the last stage).

        Held-out batches may end with a shorter one, so under a pipeline the stages exchange
        tensor shapes first (``variable_seq_lengths``). Nothing is routed in evaluation."""
        inputs = [replace(builder(batch), routing_labels=None) for batch in batches]

        def loss_fn(_item, token_loss):
            token_loss = token_loss.double()
            total = torch.stack([token_loss.sum(), torch.tensor(
                float(token_loss.numel()), dtype=torch.float64, device=token_loss.device)])
            return token_loss.sum(), {"total": total}

        variable = self.config.variable_seq_lengths
        self.config.variable_seq_lengths = ps.get_pipeline_model_parallel_world_size() > 1
        try:
            outputs = self._run(inputs, loss_fn, device, forward_only=True)
        finally:
            self.config.variable_seq_lengths = variable
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for out in outputs:
            total += out["total"]
        return total


def plain_forward_backward(module, backward: Callable, builder: InputBuilder,
                           micro_batches: list[dict], device, shard=None) -> torch.Tensor:
    """The same step without a schedule: ``backward(loss, last)`` after each micro-batch."""
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for micro, batch in enumerate(micro_batches):
        inputs = builder(batch)
        token_loss = _forward(module, inputs, device, shard)
        loss = builder.loss(token_loss, inputs) / len(micro_batches)
        backward(loss, last=micro == len(micro_batches) - 1)
        loss_sum += loss.detach()
    return loss_sum


@torch.no_grad()
def plain_forward_only(module, builder: InputBuilder, batches: list[dict], device,
                       shard=None) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        inputs = replace(builder(batch), routing_labels=None)
        token_loss = _forward(module, inputs, device, shard).double()
        total += torch.stack([token_loss.sum(), torch.tensor(
            float(token_loss.numel()), dtype=torch.float64, device=device)])
    return total
