"""Run micro-batches through a (possibly pipelined) Megatron model with Megatron's schedules.

The same call works at PP=1 and PP>1: Megatron's `get_forward_backward_func` picks the
no-pipelining or the 1F1B schedule; results come back on the last pipeline stage only.

Two micro-batch layouts enter the model:
- padded: tokens [B, T], each row one right-padded sequence, with an explicit attention mask;
- packed (`MicroBatch.packing`): tokens [1, T], the sequences laid end to end with no padding,
  and Megatron's THD `PackedSeqParams` (cu_seqlens): TE's attention keeps each sequence to
  itself and RoPE restarts at each sequence start. The local (CPU) spec gets the same
  PackedSeqParams and applies the equivalent block-diagonal causal mask, sequence by
  sequence (models/packed_attention.py).
Losses never see the layout: `MicroBatch.rows` turns per-position model outputs into the
padded [sequences, longest] layout (values are per-token scalars: the copy is tiny).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from gad_megatron.models.builder import attention_mask


@dataclass
class Packing:
    """Where the sequences of a packed micro-batch lie in its one row of tokens."""

    cu_seqlens: torch.Tensor
    """[segments + 1] int32 offsets: segment j is tokens[0, cu[j]:cu[j+1]]. The last segment
    may be alignment padding (no row of its own), so that T divides the TP size."""
    max_seqlen: int
    """The longest segment (TE's kernels and Megatron's RoPE table need it)."""
    gather: torch.Tensor
    """[N, L] long: the packed position of row n's token l (0 where l is past row n's end)."""

    def to(self, device) -> "Packing":
        # TE wants int32 cu_seqlens on the device of the activations.
        return Packing(self.cu_seqlens.to(device), self.max_seqlen, self.gather.to(device))


@dataclass
class MicroBatch:
    """Token ids for the model plus the valid mask of its sequences and what the step needs.

    Padded (packing None): tokens [B, T] right-padded, one sequence per row. Packed: tokens
    [1, T], sequences end to end. In both, `valid` is in the row layout [N, L] (N sequences,
    L the longest), as are `extra['resp_mask']`; `extra['targets']` is in the model's layout.
    """

    tokens: torch.Tensor  # [B, T] long
    valid: torch.Tensor  # [N, L] bool, True on real tokens (a prefix of each row)
    extra: dict[str, Any]
    packing: Packing | None = None

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position model outputs [B, T, ...] in the row layout [N, L, ...] (0 past each
        row's end when packed; the padded layout is already it)."""
        if self.packing is None:
            return values
        flat = values.reshape(-1, *values.shape[2:])
        picked = flat[self.packing.gather]
        keep = self.valid.reshape(*self.valid.shape, *([1] * (values.dim() - 2)))
        return torch.where(keep, picked, torch.zeros((), dtype=values.dtype,
                                                     device=values.device))

    def to(self, device) -> "MicroBatch":
        """Tokens, masks and packing on `device` (in place; returns self)."""
        self.tokens, self.valid = self.tokens.to(device), self.valid.to(device)
        for key in ("resp_mask", "targets"):
            if key in self.extra:
                self.extra[key] = self.extra[key].to(device)
        if self.packing is not None:
            self.packing = self.packing.to(device)
        return self


def model_inputs(mb: MicroBatch) -> dict[str, Any]:
    """Keyword inputs of GPTModel.forward for a micro-batch."""
    if mb.packing is not None:
        return _packed_inputs(mb)
    b, t = mb.tokens.shape
    # Megatron's RoPE uses the sequence index, so rows must be right-padded: position == index.
    positions = torch.arange(t, device=mb.tokens.device).unsqueeze(0).expand(b, t)
    return {"input_ids": mb.tokens, "position_ids": positions,
            "attention_mask": attention_mask(mb.valid)}


def _packed_inputs(mb: MicroBatch) -> dict[str, Any]:
    from megatron.core.packed_seq_params import PackedSeqParams

    pk = mb.packing
    cu = pk.cu_seqlens
    t = mb.tokens.shape[1]
    # Position within its own sequence (RoPE itself reads cu_seqlens; this is for the record).
    starts = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long())
    positions = (torch.arange(t, device=mb.tokens.device) - starts).unsqueeze(0)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=pk.max_seqlen, max_seqlen_kv=pk.max_seqlen)
    return {"input_ids": mb.tokens, "position_ids": positions, "attention_mask": None,
            "packed_seq_params": params}


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
