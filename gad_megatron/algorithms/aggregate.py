"""Reduce a per-token loss `[B, T]` to a scalar under a mask, micro-batch and DP aware.

Three modes:

* ``"token-mean"``           sum_{b,t} v*m / N_tok           (every valid token weighs the same)
* ``"seq-mean-token-mean"``  sum_b mean_t(v_b) / N_seq       (every valid sequence weighs the same)
* ``"seq-mean-token-sum"``   sum_b sum_t(v_b*m_b) / N_seq    (long sequences weigh more)

where a *valid sequence* is one with at least one valid token: a fully masked row (e.g. a
padding row added to fill a micro-batch) is left out of both numerator and denominator, so
it can never dilute the loss.

Global normaliser. Training sums the losses of several micro-batches and all-reduces (SUM)
gradients over data-parallel ranks. If every micro-batch divided by its *own* denominator
the result would be a mean of means, which differs from the loss of the whole global batch
whenever micro-batches hold different numbers of valid tokens/sequences. Passing
``global_normalizer`` = N_tok (token-mean) or N_seq (seq modes) counted over the whole global
batch (all micro-batches, all DP ranks) makes each micro-batch return only its share, so
that the SUM over micro-batches and ranks is exactly the global-batch loss.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _safe_div(num: torch.Tensor, denom: torch.Tensor | float) -> torch.Tensor:
    """num / denom, but 0 (with zero gradient) when denom is 0.

    A zero denominator only happens when everything is masked, so the numerator is 0 too;
    dividing by 1 instead keeps the result 0 and the backward free of nan.
    """
    denom = torch.as_tensor(denom, dtype=num.dtype, device=num.device)
    return num / torch.where(denom > 0, denom, torch.ones_like(denom))


def _check(values: torch.Tensor, mask: torch.Tensor, mode: str, global_normalizer) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    if values.dim() != 2:
        raise ValueError(f"values must be [B, T], got shape {tuple(values.shape)}")
    if mask.shape != values.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match values shape {tuple(values.shape)}")
    # Only python numbers are checked: reading a device tensor here would sync every call.
    if isinstance(global_normalizer, (int, float)) and global_normalizer < 0:
        raise ValueError(f"global_normalizer must be >= 0, got {global_normalizer}")


def masked_sum_per_seq(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum over valid tokens. values, mask: [B, T] -> [B].

    Uses `where` rather than `values * mask` so a nan/inf sitting at a masked position (e.g.
    the log-prob of a padding token) cannot leak into the sum as nan = inf * 0.
    """
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum(dim=-1)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    global_normalizer: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked reduction of per-token values to a scalar loss.

    Args:
        values: per-token values (loss terms).                                  # [B, T]
        mask: 1/True where the token counts (response tokens), 0/False else.    # [B, T]
        mode: one of ``AGG_MODES``.
        global_normalizer: optional denominator shared by all micro-batches and DP ranks:
            total valid tokens (``token-mean``) or total valid sequences, i.e. rows with at
            least one valid token (both ``seq-*`` modes), counted over the global batch.
            None uses this call's own count.

    Returns:
        scalar tensor. A fully masked input gives 0 with zero gradients (never nan).
    """
    _check(values, mask, mode, global_normalizer)
    valid = mask.bool()
    if mode == "token-mean":
        num = masked_sum_per_seq(values, valid).sum()
        local = valid.sum()
    else:
        tokens_per_seq = valid.sum(dim=-1)                                      # [B]
        seq_sum = masked_sum_per_seq(values, valid)                             # [B]
        if mode == "seq-mean-token-mean":
            seq_val = _safe_div(seq_sum, tokens_per_seq)
        else:
            seq_val = seq_sum
        # Fully masked rows already give 0 here; they are excluded from the count below.
        num = seq_val.sum()
        local = (tokens_per_seq > 0).sum()
    denom = local if global_normalizer is None else global_normalizer
    return _safe_div(num, denom)


def aggregate_normalizer(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The denominator ``aggregate`` would use for this mask: N_tok or N_seq. mask: [B, T].

    Sum this over all micro-batches (and all-reduce it over DP ranks) to get the
    ``global_normalizer`` for a global batch.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    valid = mask.bool()
    if mode == "token-mean":
        return valid.sum()
    return (valid.sum(dim=-1) > 0).sum()
