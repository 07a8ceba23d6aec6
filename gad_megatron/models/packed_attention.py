"""Core attention of the local (CPU) layer spec that also takes THD-packed sequences.

Megatron's local `DotProductAttention` refuses `PackedSeqParams` (only TE's kernels take the
THD format). Everything around the core attention already handles THD in Megatron itself:
the QKV projection, RoPE restarted at each `cu_seqlens` start, and the reshape back. So the
one piece the CPU path needs is this module, swapped into the local spec by ModuleSpec
(models/builder.layer_spec): for packed input it builds the block-diagonal causal mask that
keeps each sequence to itself (the mask TE applies implicitly) and runs Megatron's own
DotProductAttention on the packed row; unpacked input passes straight through.

The mask costs [T, T] booleans for a packed row of T tokens, as the padded layout's mask
does for [B, T, T]: fine on CPU at test sizes, which is where this spec runs (on CUDA the TE
spec is used, which never materialises the mask).
"""

from __future__ import annotations

import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, T, T] Megatron mask (True = masked) for sequences laid end to end: a query sees
    only earlier-or-same positions of its own segment."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device),
                                      lengths)
    if segment.numel() != total:
        raise ValueError(f"cu_seqlens cover {segment.numel()} tokens, the packed row has {total}")
    pos = torch.arange(total, device=cu_seqlens.device)
    visible = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
    return ~visible[None, None]


class PackedDotProductAttention(MegatronModule):
    """Megatron's DotProductAttention (held, not subclassed) plus the THD case."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config)
        self.inner = DotProductAttention(config=config, **kwargs)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is None:
            return self.inner(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                              attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention takes qkv_format 'thd', got "
                             f"{packed_seq_params.qkv_format!r}")
        # Megatron squeezed the dummy batch dimension of THD input: [T, heads, dim].
        q, k, v = (x.unsqueeze(1) for x in (query, key, value))
        mask = packed_causal_mask(packed_seq_params.cu_seqlens_q, q.shape[0])
        out = self.inner(q, k, v, mask, attn_mask_type=attn_mask_type,
                         attention_bias=attention_bias)  # [T, 1, heads * dim]
        return out
