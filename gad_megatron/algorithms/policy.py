"""Generator-side maths: GRPO advantages, PPO/GSPO clipped policy loss, SFT loss, KL estimates.

All functions are pure: explicit tensors and numbers in, tensors (and python-float metrics)
out. Shapes: B sequences, T response positions; `mask` marks the valid response tokens.
"""

from __future__ import annotations

import torch

from gad_megatron.algorithms.aggregate import aggregate, masked_sum_per_seq

POLICY_LOSS_KINDS = ("ppo", "gspo")
KL_KINDS = ("k1", "abs", "k2", "k3", "low_var_kl")

# exp(20) ~ 4.9e8: far outside any clip range, yet finite in fp16/bf16/fp32, so a wild
# log-ratio (stale old_log_probs, a -inf at a padding slot) can never overflow to inf.
LOG_RATIO_BOUND = 20.0
# k3 grows like exp(x); past 10 nats it is noise that would dominate the mean.
K3_BOUND = 10.0


def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages: reward minus its group's mean (over samples of one prompt).

    Args:
        rewards: one scalar reward per sample.                                   # [B] float
        group_index: group id per sample; arbitrary integers (need not be contiguous or
            sorted).                                                              # [B] long
        norm_by_std: divide by (group's unbiased std + eps).
        eps: keeps the division finite when all rewards of a group are equal.

    Returns:
        advantages, same order as `rewards`.                                     # [B]
        A group of one sample gets 0: with nothing to compare against it carries no signal.
    """
    if rewards.dim() != 1 or group_index.dim() != 1 or rewards.shape != group_index.shape:
        raise ValueError(
            f"rewards and group_index must both be [B]; got {tuple(rewards.shape)} and "
            f"{tuple(group_index.shape)}")
    if group_index.is_floating_point() or group_index.is_complex():
        raise ValueError(f"group_index must be an integer tensor, got {group_index.dtype}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    # Map arbitrary ids to 0..G-1 so the per-group sums are plain index_add_ on [G] buffers.
    ids, inv = torch.unique(group_index, return_inverse=True)                    # [G], [B]
    count = torch.zeros(ids.numel(), dtype=rewards.dtype, device=rewards.device)
    count.index_add_(0, inv, torch.ones_like(rewards))                           # [G]
    total = torch.zeros_like(count).index_add_(0, inv, rewards)                  # [G]
    mean = total / count
    centered = rewards - mean[inv]                                               # [B]
    n = count[inv]                                                               # [B]
    if norm_by_std:
        sq = torch.zeros_like(count).index_add_(0, inv, centered * centered)     # [G]
        # Unbiased (n-1); clamped so a singleton group divides by 1, not 0 (it is zeroed below).
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        centered = centered / (std[inv] + eps)
    return torch.where(n > 1, centered, torch.zeros_like(centered))


def _check_policy_inputs(log_probs, old_log_probs, advantages, mask, kind, clip_low, clip_high,
                         dual_clip) -> None:
    if kind not in POLICY_LOSS_KINDS:
        raise ValueError(
            f"unknown policy loss kind {kind!r}; valid kinds: {', '.join(POLICY_LOSS_KINDS)}")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [B, T], got {tuple(log_probs.shape)}")
    for name, t in (("old_log_probs", old_log_probs), ("mask", mask)):
        if t.shape != log_probs.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} != log_probs shape {tuple(log_probs.shape)}")
    if advantages.shape != log_probs.shape[:1]:
        raise ValueError(
            f"advantages must be [B]={log_probs.shape[0]}, got {tuple(advantages.shape)}")
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (a cap on -A*ratio for A<0), got {dual_clip}")


def _importance_log_ratio(log_probs, old_log_probs, valid, kind) -> torch.Tensor:
    """Per-token log importance ratio whose exp is the ratio used in the surrogate. [B, T]

    ppo:  log r_t = logp_t - old_t.
    gspo: log s_i = masked mean_t (logp_t - old_t) (length-normalised sequence ratio), used at
          every token as sg[log s_i] + logp_t - sg[logp_t]: the value is the sequence ratio
          s_i, and d exp(.)/d logp_t = s_i. Averaged over the |y_i| tokens, token t gets
          s_i/|y_i|, which is exactly d s_i/d logp_t: GSPO's sequence-level gradient.
    """
    zeros = torch.zeros_like(log_probs)
    # `where` so garbage at masked positions (e.g. -inf log-probs on padding) is never used.
    token = torch.where(valid, log_probs - old_log_probs, zeros)
    if kind == "ppo":
        return token.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    n_tok = valid.sum(dim=-1).clamp(min=1).to(log_probs.dtype)                   # [B]
    seq = (masked_sum_per_seq(token, valid) / n_tok).detach()                    # [B]
    # Bound only the stop-gradient part: the differentiable part is identically 0 in value,
    # and clamping it would cut the gradient.
    seq = seq.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    lp = torch.where(valid, log_probs, zeros)
    return seq.unsqueeze(-1) + lp - lp.detach()


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> float:
    n = int(valid.sum().item())
    return float(masked_sum_per_seq(x, valid).sum().item() / n) if n else 0.0


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    clip_low: float,
    clip_high: float,
    agg: str,
    dual_clip: float | None = None,
    global_normalizer: float | int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate policy-gradient loss (PPO token ratio or GSPO sequence ratio).

    Args:
        log_probs: current policy log-probs of the sampled tokens (requires grad).  # [B, T]
        old_log_probs: behaviour-policy log-probs (no grad).                        # [B, T]
        advantages: one advantage per sequence, broadcast over its tokens.          # [B]
        mask: valid response tokens.                                                # [B, T]
        kind: ``"ppo"`` (ratio per token) or ``"gspo"`` (length-normalised sequence ratio,
            GSPO-token form; use small clips, the paper has 3e-4 / 4e-4).
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high].
        agg: aggregation mode for ``aggregate``.
        dual_clip: for A < 0 cap the token loss at -A * dual_clip (> 1); None disables.
        global_normalizer: see ``aggregate``.

    Per-token loss = max(-A*r, -A*clip(r)), then for A < 0 with dual clip min(that, -A*c).

    Returns:
        (loss scalar, metrics) with python-float metrics over this call's valid tokens:
        ``clip_frac`` (clipped branch strictly larger, i.e. gradient cut by clipping),
        ``approx_kl`` (k3 estimate of KL(old || new): r - 1 - log r with the token ratio,
        >= 0 and low-variance), ``ratio_mean`` (mean ratio used, sequence ratio for gspo),
        and ``dual_clip_frac`` when dual_clip is set.
    """
    _check_policy_inputs(log_probs, old_log_probs, advantages, mask, kind, clip_low,
                         clip_high, dual_clip)
    valid = mask.bool()
    log_ratio = _importance_log_ratio(log_probs, old_log_probs, valid, kind)     # [B, T]
    ratio = torch.exp(log_ratio)
    adv = advantages.to(log_probs.dtype).unsqueeze(-1).expand_as(ratio)         # [B, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    tok_loss = torch.maximum(unclipped, clipped)
    metrics = {}
    if dual_clip is not None:
        cap = -adv * dual_clip
        capped = (adv < 0) & (tok_loss > cap)
        tok_loss = torch.where(capped, cap, tok_loss)
        metrics["dual_clip_frac"] = _masked_mean(capped.to(log_probs.dtype), valid)
    loss = aggregate(tok_loss, valid, agg, global_normalizer)
    with torch.no_grad():
        metrics["clip_frac"] = _masked_mean((clipped > unclipped).to(log_probs.dtype), valid)
        tok_lr = torch.where(valid, log_probs - old_log_probs, torch.zeros_like(log_probs))
        tok_lr = tok_lr.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        metrics["approx_kl"] = _masked_mean(torch.expm1(tok_lr) - tok_lr, valid)
        metrics["ratio_mean"] = _masked_mean(ratio.detach(), valid)
    return loss, metrics


def sft_loss(
    log_probs: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    global_normalizer: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the teacher tokens. log_probs, mask: [B, T] -> scalar."""
    return aggregate(-log_probs, mask, agg, global_normalizer)


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi. Both [B, T] -> [B, T].

    With d = logp - ref:
      ``k1``: d (unbiased, high variance, can be negative);
      ``abs``: |d|;
      ``k2``: d^2 / 2 (biased, low variance);
      ``k3`` / ``low_var_kl``: exp(-d) + d - 1 (unbiased, >= 0); -d is bounded to +-20 before
          exp so it cannot overflow, and the result is clamped to [-10, 10].
    No masking here: the caller aggregates with its response mask.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown kl kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)} and ref_log_probs "
            f"{tuple(ref_log_probs.shape)} must have the same shape")
    d = log_probs - ref_log_probs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d * d
    neg = (-d).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)                          # ref - logp
    return (torch.exp(neg) - neg - 1.0).clamp(-K3_BOUND, K3_BOUND)
