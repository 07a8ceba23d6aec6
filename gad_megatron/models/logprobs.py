"""Token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for a contiguous slice of the (padded) vocabulary. The reductions
over the vocabulary (max, sum of exp, target logit, sum of p*logit) are done locally and
summed over the TP group, so memory stays [B, T, V/tp] per rank. Gradients flow through the
differentiable all-reduce (identity backward), which is exact because every reduced quantity
is a sum of per-rank contributions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 1, 0
    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank())


def _sum_over_tp(x: torch.Tensor, group, size: int) -> torch.Tensor:
    if size == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def _shifted(logits: torch.Tensor, group, size: int, vocab_size: int | None, rank: int):
    # Mask the TP-padding rows of the vocabulary so they never get probability mass.
    local_v = logits.shape[-1]
    if vocab_size is not None and vocab_size < local_v * size:
        ids = torch.arange(local_v, device=logits.device) + rank * local_v
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    lmax = logits.detach().max(dim=-1, keepdim=True).values
    if size > 1:
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=group)
    return logits - lmax  # [B, T, V/tp], max over the full vocabulary is 0


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                            vocab_size: int | None = None, temperature: float = 1.0,
                            with_entropy: bool = False):
    """log p(target) for each position, and optionally the entropy of p.

    logits: [B, T, V/tp] float (this rank's vocabulary slice); targets: [B, T] long ids in
    the full vocabulary. `vocab_size` (unpadded) excludes padding rows. Returns [B, T] log-probs
    (and [B, T] entropy when `with_entropy`).
    """
    group, size, rank = _tp()
    # Reductions in at least fp32: bf16 log-probs would swamp the PPO ratio with rounding.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    shifted = _shifted(logits, group, size, vocab_size, rank)
    exp = shifted.exp()
    sum_exp = _sum_over_tp(exp.sum(dim=-1), group, size)  # [B, T]
    log_z = sum_exp.log()
    local_v = shifted.shape[-1]
    start = rank * local_v
    local_t = targets - start
    in_slice = (local_t >= 0) & (local_t < local_v)
    picked = shifted.gather(-1, local_t.clamp(0, local_v - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = _sum_over_tp(torch.where(in_slice, picked, torch.zeros_like(picked)),
                                group, size)
    logp = target_logit - log_z
    if not with_entropy:
        return logp
    # H = log Z - sum_v p_v * shifted_v, with p_v = exp_v / Z; padding rows give 0 * -inf.
    weighted = torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(dim=-1)
    entropy = log_z - _sum_over_tp(weighted, group, size) / sum_exp
    return logp, entropy
