"""Discriminator-side maths: Bradley-Terry loss, remedies for an over-confident D, metrics.

In GAD the discriminator D scores a (prompt, response) pair with one scalar and is trained
so that the teacher's response outscores each student response to the same prompt:
P(teacher preferred) = sigmoid((t - s - margin) / temperature).

The remedies (`adaptive_temperature`, `score_regularizer`, `normalize_scores`) are small,
separate functions; none is applied by `bradley_terry_loss` itself. `discriminator_loss`
composes them in one fixed order, as the config turns them on (DiscriminatorConfig). They
target the failure seen in practice: D gets over-confident (d_acc ~ 0.94, score gap ~ 10),
the sigmoid saturates and the student's reward stops carrying a useful gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> None:
    if teacher_scores.dim() != 1 or teacher_scores.shape != student_scores.shape:
        raise ValueError(
            "teacher_scores and student_scores must both be [B] with the same B (repeat each "
            f"teacher score for every student sample of its prompt); got "
            f"{tuple(teacher_scores.shape)} and {tuple(student_scores.shape)}")


def bradley_terry_loss(
    teacher_scores: torch.Tensor,
    student_scores: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    margin: float = 0.0,
) -> torch.Tensor:
    """mean_b -log sigmoid((t_b - s_b - margin) / temperature).

    Args:
        teacher_scores: D's score of the teacher response, repeated per student sample. # [B]
        student_scores: D's score of each student response.                            # [B]
        temperature: > 0; larger softens the sigmoid (less confident D).
        margin: the teacher must win by this much before the loss stops pushing.

    Returns:
        scalar. Uses logsigmoid (a stable softplus), so a gap of +-1e4 gives ~0 or ~gap,
        never inf/nan, and its gradient stays finite (bounded by 1/temperature per pair).
    """
    _check_pair(teacher_scores, student_scores)
    temp = torch.as_tensor(temperature, dtype=teacher_scores.dtype, device=teacher_scores.device)
    if temp.numel() != 1 or not bool(temp > 0):
        raise ValueError(f"temperature must be a single number > 0, got {temperature}")
    if teacher_scores.numel() == 0:
        raise ValueError("bradley_terry_loss needs at least one pair")
    z = (teacher_scores - student_scores - margin) / temp                       # [B]
    return -F.logsigmoid(z).mean()


def adaptive_temperature(
    gap: float | torch.Tensor, base: float, scale: float, lo: float, hi: float,
) -> float:
    """Temperature that grows with how far apart D's scores are.

    T = clamp(base + scale * |gap|, lo, hi)

    `gap` is the mean score gap mean(t - s) as a number, or a tensor of per-pair gaps (t - s)
    whose mean absolute value is used. Returns a python float: the temperature is a
    schedule, not something to differentiate through (a gradient through it would let D
    lower its loss by widening the gap, which is the opposite of the intent).
    With D at gap ~10, base=1, scale=0.5, hi=8: T = clamp(1 + 5, lo, 8) = 6, so z = 10/6 and
    the sigmoid leaves saturation.
    """
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < lo <= hi, got lo={lo}, hi={hi}")
    if scale < 0:
        raise ValueError(f"scale must be >= 0 (temperature grows with the gap), got {scale}")
    if isinstance(gap, torch.Tensor):
        g = float(gap.detach().abs().float().mean().item()) if gap.numel() else 0.0
    else:
        g = abs(float(gap))
    return float(min(max(base + scale * g, lo), hi))


def score_regularizer(scores: torch.Tensor, threshold: float, weight: float) -> torch.Tensor:
    """weight * mean(relu(|score| - threshold)^2): penalise only scores beyond +-threshold.

    Keeps D's raw scores in a band where the sigmoid still has slope, without touching scores
    inside it. scores: [N] (any shape; all elements averaged) -> scalar; 0 for empty input.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if scores.numel() == 0:
        return scores.sum() * 0.0
    excess = F.relu(scores.abs() - threshold)
    return weight * (excess * excess).mean()


def normalize_scores(
    teacher_scores: torch.Tensor, student_scores: torch.Tensor, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-normalise teacher and student scores together.

    x_norm = (x - mu) / sqrt(var + eps), with mu and the population variance var taken over
    the concatenation [t, s], so both sides share one affine map and their order (and the
    sign of every t - s) is preserved while the scale is fixed at ~1. Gradients flow through
    mu and var as in batch norm. eps keeps a constant batch (var = 0) finite: it maps to 0.

    Args: teacher_scores [Bt], student_scores [Bs]. Returns (t_norm [Bt], s_norm [Bs]).
    """
    if teacher_scores.dim() != 1 or student_scores.dim() != 1:
        raise ValueError("normalize_scores expects 1-D teacher and student scores")
    both = torch.cat([teacher_scores, student_scores])                          # [Bt + Bs]
    if both.numel() == 0:
        return teacher_scores, student_scores
    mu = both.mean()
    var = ((both - mu) ** 2).mean()
    normed = (both - mu) / torch.sqrt(var + eps)
    return normed[: teacher_scores.numel()], normed[teacher_scores.numel():]


@torch.no_grad()
def discriminator_metrics(
    teacher_scores: torch.Tensor,
    student_scores: torch.Tensor,
    identical: torch.Tensor | None = None,
) -> dict:
    """Python-number diagnostics of D on one batch of pairs.

    Args:
        teacher_scores, student_scores: paired scores.                                 # [B]
        identical: optional bool mask of pairs whose student response equals the teacher's
            token for token. A correct D scores those equally, so their mean |t - s| should
            be ~0; a large value means D keys on something other than the text.         # [B]

    Returns keys: ``d_acc`` (fraction with t > s; a tie counts as wrong), ``score_gap``
    (mean t - s), ``teacher_score_{mean,min,max}``, ``student_score_{mean,min,max}``, and
    ``identical_count`` (int) / ``identical_abs_gap`` (0.0 when no pair is identical).
    """
    _check_pair(teacher_scores, student_scores)
    if teacher_scores.numel() == 0:
        raise ValueError("discriminator_metrics needs at least one pair")
    t = teacher_scores.detach().float()
    s = student_scores.detach().float()
    out = {
        "d_acc": (t > s).float().mean().item(),
        "score_gap": (t - s).mean().item(),
        "teacher_score_mean": t.mean().item(),
        "teacher_score_min": t.min().item(),
        "teacher_score_max": t.max().item(),
        "student_score_mean": s.mean().item(),
        "student_score_min": s.min().item(),
        "student_score_max": s.max().item(),
        "identical_count": 0,
        "identical_abs_gap": 0.0,
    }
    if identical is not None:
        if identical.shape != t.shape:
            raise ValueError(
                f"identical mask shape {tuple(identical.shape)} != scores shape {tuple(t.shape)}")
        same = identical.bool()
        n = int(same.sum().item())
        out["identical_count"] = n
        if n:
            out["identical_abs_gap"] = ((t - s).abs()[same].mean().item())
    return out


def discriminator_loss(
    teacher_scores: torch.Tensor,
    student_scores: torch.Tensor,
    *,
    temperature: float = 1.0,
    margin: float = 0.0,
    normalize: bool = False,
    normalize_eps: float = 1e-6,
    adaptive: tuple[float, float, float] | None = None,
    reg_weight: float = 0.0,
    reg_threshold: float = 5.0,
) -> torch.Tensor:
    """The BT loss with the configured remedies, composed in one fixed order.

    1. `normalize`: t, s <- normalize_scores(t, s, normalize_eps) (one affine map for both).
    2. `adaptive` = (scale, lo, hi): T = adaptive_temperature(t - s, temperature, scale, lo,
       hi), the gap taken *after* step 1 (so with both on, T sees the normalised gap);
       None keeps T = `temperature`.
    3. loss = bradley_terry_loss(t, s, T, margin)
    4. `reg_weight` > 0: + score_regularizer(cat[t, s], reg_threshold, reg_weight), on the
       *raw* scores (the regulariser exists to keep raw scores in the sigmoid's range,
       which normalisation would hide).

    Args: paired scores [B] (teacher repeated per student sample). Returns a scalar.
    With every option at its default this is exactly `bradley_terry_loss(t, s)`.
    """
    _check_pair(teacher_scores, student_scores)
    t, s = teacher_scores, student_scores
    if normalize:
        t, s = normalize_scores(t, s, normalize_eps)
    temp = temperature
    if adaptive is not None:
        scale, lo, hi = adaptive
        temp = adaptive_temperature(t - s, temperature, scale, lo, hi)
    loss = bradley_terry_loss(t, s, temp, margin)
    if reg_weight > 0:
        loss = loss + score_regularizer(
            torch.cat([teacher_scores, student_scores]), reg_threshold, reg_weight)
    return loss
