"""Token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary,
and without full-vocabulary fp32 copies under autograd.

Each TP rank holds logits for a contiguous slice of the (padded) vocabulary. The reductions
over the vocabulary (max, sum of exp, target logit, sum of p*logit) are done locally and
summed over the TP group, so memory stays [N, V/tp] per rank.

Memory (issue 14, defect 11): written as plain autograd, the fp32 promotion, the temperature
division, the shifted logits, their exp and p*logit would each be a saved [N, V/tp] fp32
copy (about 5 GB each at 8K tokens and a 152K vocabulary). Here one autograd function runs
the forward in chunks of `chunk_tokens` positions under no_grad and saves only its input
logits (already alive: they are the model's output) and three floats per position (max,
log Z, entropy); the backward recomputes each chunk's softmax and writes its gradient:
  d logp_t / d s_j = [j == t] - p_j,        d H / d s_j = -p_j (log p_j + H),
with s = logits / T, times 1/T for the logits. Both are local per vocabulary slice once the
global log Z and H are known, so the backward needs no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_TOKENS = 1024
"""Positions per chunk: the transient fp32 memory is a few [chunk, V/tp] tensors."""


def _tp():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 1, 0
    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank())


def _all_reduce(x: torch.Tensor, group, size: int, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if size > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _scaled(chunk: torch.Tensor, temperature: float, pad_from: int | None) -> torch.Tensor:
    """fp32 (at least) logits / T of one chunk, padding rows of the vocabulary at -inf."""
    s = chunk.to(torch.promote_types(chunk.dtype, torch.float32))
    s = s / temperature if temperature != 1.0 else s.clone()
    if pad_from is not None:
        s[..., pad_from:] = float("-inf")
    return s


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_size, temperature, with_entropy, chunk_tokens):
        group, size, rank = _tp()
        local_v = logits.shape[-1]
        start = rank * local_v
        pad_from = None  # first padding row of this slice (local index), if any
        if vocab_size is not None and vocab_size < start + local_v:
            pad_from = max(vocab_size - start, 0)
        flat, tgt = logits.reshape(-1, local_v), targets.reshape(-1)
        n, acc = flat.shape[0], torch.promote_types(logits.dtype, torch.float32)
        lmax, log_z, logp, ent = (torch.zeros(n, dtype=acc, device=logits.device)
                                  for _ in range(4))  # three floats per position are saved
        for lo in range(0, n, chunk_tokens):  # same chunk count on every TP rank
            hi = min(lo + chunk_tokens, n)
            s = _scaled(flat[lo:hi], temperature, pad_from)  # [c, V/tp]
            m = _all_reduce(s.max(dim=-1).values, group, size, dist.ReduceOp.MAX)
            s -= m.unsqueeze(-1)
            e = s.exp()
            local_t = tgt[lo:hi] - start
            in_slice = (local_t >= 0) & (local_t < local_v)
            picked = s.gather(-1, local_t.clamp(0, local_v - 1).unsqueeze(-1)).squeeze(-1)
            sums = [e.sum(-1), torch.where(in_slice, picked, torch.zeros_like(picked))]
            if with_entropy:  # sum_v p_v * s_v, padding rows give 0 * -inf
                sums.append(torch.where(e > 0, e * s, torch.zeros_like(e)).sum(-1))
            sums = _all_reduce(torch.stack(sums), group, size)  # one all-reduce per chunk
            lmax[lo:hi], log_z[lo:hi] = m, sums[0].log()
            logp[lo:hi] = sums[1] - log_z[lo:hi]
            if with_entropy:
                ent[lo:hi] = log_z[lo:hi] - sums[2] / sums[0]
        ctx.save_for_backward(logits, targets, lmax, log_z, ent)
        ctx.args = (temperature, pad_from, start, chunk_tokens, with_entropy)
        shape = targets.shape
        return logp.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, targets, lmax, log_z, ent = ctx.saved_tensors
        temperature, pad_from, start, chunk_tokens, with_entropy = ctx.args
        local_v = logits.shape[-1]
        flat, tgt = logits.reshape(-1, local_v), targets.reshape(-1)
        g_logp = g_logp.reshape(-1) if g_logp is not None else torch.zeros_like(log_z)
        g_ent = g_ent.reshape(-1) if (g_ent is not None and with_entropy) else None
        grad = torch.empty_like(flat)
        for lo in range(0, flat.shape[0], chunk_tokens):
            hi = min(lo + chunk_tokens, flat.shape[0])
            s = _scaled(flat[lo:hi], temperature, pad_from)
            s -= (lmax[lo:hi] + log_z[lo:hi]).unsqueeze(-1)  # s is now log p
            p = s.exp()  # [c, V/tp]
            g = p * -g_logp[lo:hi].unsqueeze(-1)
            local_t = tgt[lo:hi] - start
            rows = torch.nonzero((local_t >= 0) & (local_t < local_v)).squeeze(-1)
            g[rows, local_t[rows]] += g_logp[lo:hi][rows]
            if g_ent is not None:
                logp = torch.where(p > 0, s, torch.zeros_like(s))
                g -= g_ent[lo:hi].unsqueeze(-1) * p * (logp + ent[lo:hi].unsqueeze(-1))
            grad[lo:hi] = (g / temperature).to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                            vocab_size: int | None = None, temperature: float = 1.0,
                            with_entropy: bool = False, chunk_tokens: int = CHUNK_TOKENS):
    """log p(target) for each position, and optionally the entropy of p.

    logits: [B, T, V/tp] float (this rank's vocabulary slice); targets: [B, T] long ids in
    the full vocabulary. `vocab_size` (unpadded) excludes padding rows. Returns [B, T]
    log-probs (and [B, T] entropy when `with_entropy`), in at least fp32: bf16 log-probs
    would swamp the PPO ratio with rounding. Differentiable with respect to `logits`.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    logp, ent = _VocabParallelLogprobs.apply(logits, targets, vocab_size, temperature,
                                             with_entropy, chunk_tokens)
    return (logp, ent) if with_entropy else logp


def micro_batch_logprobs(logits: torch.Tensor, mb, vocab_size: int | None,
                         temperature: float = 1.0, with_entropy: bool = False):
    """`vocab_parallel_logprobs` of a micro-batch (padded or packed, models/forward.py),
    against its own targets, in the row layout [N, L] (`MicroBatch.rows`)."""
    out = vocab_parallel_logprobs(logits, mb.extra["targets"], vocab_size, temperature,
                                  with_entropy)
    return tuple(mb.rows(x) for x in out) if with_entropy else mb.rows(out)
