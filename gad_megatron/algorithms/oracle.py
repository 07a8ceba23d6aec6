"""How well D's scores agree with a task's own acceptance test (measurement only).

A discriminator can be accurate on teacher-vs-student pairs and still useless as a reward:
it may have learned what marks an answer as the student's (its style) rather than what makes
an answer right. On a task that can judge answers (the styles task's `accepts`), two figures
of each step's training rollouts say which it is:

- `oracle_auc`: the probability that D scores a random accepted sample above a random
  rejected one (ties count half): 1.0 a perfect reward, 0.5 noise, below 0.5 a reward
  that pushes the student away from right answers.
- `oracle_auc_in_group`: the same AUC within each prompt's group of samples, averaged over
  the groups that have both kinds. GRPO compares samples only within their group, so this
  is the ranking the policy update actually follows.
- `teacher_vs_accepted_gap`: D's mean score on teacher answers minus its mean on accepted
  samples. Large while the AUC is near 0.5: D rewards style, not correctness.

Both are undefined on some steps (no accepted, or no rejected, sample); they are then None,
never a made-up 0.5, so a curve of them has gaps rather than false points.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def oracle_auc(scores: torch.Tensor, accepted: torch.Tensor) -> float | None:
    """AUC of `scores` [N] for telling accepted (True) from rejected samples [N], or None
    when either class is empty. Mann-Whitney: pairs (accepted, rejected) with the accepted
    one scored higher, plus half the ties, over all such pairs."""
    if scores.shape != accepted.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and accepted {tuple(accepted.shape)} "
                         "must be the same 1-D shape")
    acc = accepted.bool()
    pos, neg = scores[acc].double(), scores[~acc].double()
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    diff = pos[:, None] - neg[None, :]  # [P, Q]
    wins = (diff > 0).double().sum() + 0.5 * (diff == 0).double().sum()
    return float(wins / diff.numel())


@torch.no_grad()
def grouped_oracle_auc(scores: torch.Tensor, accepted: torch.Tensor,
                       group: torch.Tensor) -> float | None:
    """Mean over groups (e.g. a prompt's samples) of `oracle_auc` within the group, over
    the groups where it is defined; None when it is defined in none. group: [N] ids."""
    if group.shape != scores.shape:
        raise ValueError("group must have one id per score")
    aucs = [a for g in torch.unique(group).tolist()
            if (a := oracle_auc(scores[group == g], accepted[group == g])) is not None]
    return sum(aucs) / len(aucs) if aucs else None


@torch.no_grad()
def teacher_vs_accepted_gap(teacher_scores: torch.Tensor, sample_scores: torch.Tensor,
                            accepted: torch.Tensor) -> float | None:
    """mean(teacher_scores) - mean(sample_scores[accepted]), or None without an accepted
    sample. teacher_scores: one per prompt [G]; sample_scores, accepted: [N]."""
    if sample_scores.shape != accepted.shape:
        raise ValueError("sample_scores and accepted must have the same shape")
    if teacher_scores.numel() == 0:
        raise ValueError("teacher_vs_accepted_gap needs at least one teacher score")
    acc = accepted.bool()
    if not bool(acc.any()):
        return None
    return float(teacher_scores.double().mean() - sample_scores[acc].double().mean())


def oracle_metrics(teacher_scores: torch.Tensor, sample_scores: torch.Tensor,
                   accepted: torch.Tensor, group: torch.Tensor | None = None
                   ) -> dict[str, float]:
    """The step's oracle figures, leaving out the undefined ones; `accept_rate` always;
    `oracle_auc_in_group` when `group` (each sample's prompt) is given."""
    out = {"accept_rate": float(accepted.double().mean()) if accepted.numel() else 0.0}
    figures = {"oracle_auc": oracle_auc(sample_scores, accepted),
               "teacher_vs_accepted_gap": teacher_vs_accepted_gap(teacher_scores,
                                                                  sample_scores, accepted)}
    if group is not None:
        figures["oracle_auc_in_group"] = grouped_oracle_auc(sample_scores, accepted, group)
    return {**out, **{k: v for k, v in figures.items() if v is not None}}
