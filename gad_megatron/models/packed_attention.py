"""Core attention of the local (CPU) layer spec that also takes THD-packed sequences.

Megatron's local `DotProductAttention` refuses `PackedSeqParams` (only TE's kernels take the
THD format). Everything around the core attention already handles THD in Megatron itself:
the QKV projection, RoPE restarted at each `cu_seqlens` start, and the reshape back. So the
one piece the CPU path needs is this module, swapped into the local spec by ModuleSpec
(models/builder.layer_spec). For packed input it applies the block-diagonal causal mask that
keeps each sequence to itself (what TE's varlen kernels do), block by block: Megatron's own
DotProductAttention runs on each sequence with its causal mask, so the work is
sum(L_i^2), not T^2, and no position attends across sequences. Unpacked input passes
straight through.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule

from gad_megatron.models.builder import causal_mask


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
        cu = packed_seq_params.cu_seqlens_q
        lengths = (cu[1:] - cu[:-1]).tolist()
        if sum(lengths) != query.shape[0]:
            raise ValueError(f"cu_seqlens cover {sum(lengths)} tokens, the packed row has "
                             f"{query.shape[0]}")
        # Megatron squeezed the dummy batch dimension of THD input: [T, heads, dim].
        outs = [self.inner(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                           causal_mask(len(q)).to(q.device)[None, None],
                           attn_mask_type=attn_mask_type,
                           attention_bias=attention_bias)  # [L_i, 1, heads * dim]
                for q, k, v in zip(query.split(lengths), key.split(lengths),
                                   value.split(lengths))]
        return torch.cat(outs, dim=0)
