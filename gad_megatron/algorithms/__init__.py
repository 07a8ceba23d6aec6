"""GAD maths as pure tensor functions (torch only: no Megatron, no Ray, no config objects).

discriminator: Bradley-Terry loss, over-confidence remedies, D metrics.
policy:        GRPO advantages, PPO/GSPO policy loss, SFT loss, KL estimates.
aggregate:     masked loss reduction with a global (micro-batch x DP) normaliser.
oracle:        D's scores against a task's acceptance test (measurement only).
"""

from gad_megatron.algorithms.aggregate import AGG_MODES, aggregate, aggregate_normalizer
from gad_megatron.algorithms.discriminator import (
    adaptive_temperature,
    bradley_terry_loss,
    discriminator_loss,
    discriminator_metrics,
    normalize_scores,
    score_regularizer,
)
from gad_megatron.algorithms.oracle import (
    grouped_oracle_auc, oracle_auc, oracle_metrics, teacher_vs_accepted_gap)
from gad_megatron.algorithms.policy import (
    KL_KINDS,
    POLICY_LOSS_KINDS,
    grpo_advantages,
    kl_estimate,
    policy_loss,
    sft_loss,
)

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "POLICY_LOSS_KINDS",
    "adaptive_temperature",
    "aggregate",
    "aggregate_normalizer",
    "bradley_terry_loss",
    "discriminator_loss",
    "discriminator_metrics",
    "grouped_oracle_auc",
    "grpo_advantages",
    "kl_estimate",
    "normalize_scores",
    "oracle_auc",
    "oracle_metrics",
    "policy_loss",
    "score_regularizer",
    "sft_loss",
    "teacher_vs_accepted_gap",
]
