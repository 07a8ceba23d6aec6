"""Run micro-batches through a (possibly pipelined) Megatron model with Megatron's schedules.

The same call works at PP=1 and PP>1: Megatron's `get_forward_backward_func` picks the
no-pipelining or the 1F1B schedule; results come back on the last pipeline stage only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from gad_megatron.models.builder import attention_mask


@dataclass
class MicroBatch:
    """Right-padded token ids and their valid mask, plus whatever the step needs."""

    tokens: torch.Tensor  # [B, T] long
    valid: torch.Tensor  # [B, T] bool, True on real tokens (a prefix of each row)
    extra: dict[str, Any]


def model_inputs(mb: MicroBatch) -> dict[str, torch.Tensor]:
    """Keyword inputs of GPTModel.forward for a micro-batch."""
    b, t = mb.tokens.shape
    # Megatron's RoPE uses the sequence index, so rows must be right-padded: position == index.
    positions = torch.arange(t, device=mb.tokens.device).unsqueeze(0).expand(b, t)
    return {"input_ids": mb.tokens, "position_ids": positions,
            "attention_mask": attention_mask(mb.valid)}


def _unwrap(model):
    """The module under DDP / Float16Module wrappers (which all keep it as `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def run_schedule(model, micro_batches: list[MicroBatch],
                 on_output: Callable[[torch.Tensor, MicroBatch], Any],
                 forward_only: bool = True) -> list[Any]:
    """Feed `micro_batches` through `model`; call `on_output(output, mb)` on the last stage.

    With forward_only=True, `on_output` returns any data (collected and returned in order).
    With forward_only=False it must return `(loss, num_tokens, metrics)` as Megatron's
    schedules expect; the loss is backpropagated and the metrics dicts are returned.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    from megatron.core import parallel_state as ps

    shapes = {tuple(mb.tokens.shape) for mb in micro_batches}
    pipelined = ps.get_pipeline_model_parallel_world_size() > 1
    if len(shapes) != 1 and pipelined and not _unwrap(model).config.variable_seq_lengths:
        # Without variable_seq_lengths, stages exchange activations of one fixed shape.
        raise ValueError(f"all micro-batches must share one [B, T] shape for this pipeline "
                         f"(variable_seq_lengths is off), got {sorted(shapes)}")
    b, t = max(shapes)
    it = iter(micro_batches)

    def step(data_iterator, chunk):
        mb = next(data_iterator)
        out = chunk(**model_inputs(mb))
        if forward_only:
            return out, lambda o, non_loss_data=True: on_output(o, mb)
        return out, lambda o: on_output(o, mb)

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=it, model=[model],
        num_microbatches=len(micro_batches), seq_length=t, micro_batch_size=b,
        forward_only=forward_only, collect_non_loss_data=forward_only,
    )
