"""The allowed values of each config field, checked by the loader as each key is read.

One table for the whole config tree, so every refusal names the full key
(`actor.optim.lr: must be > 0, got -1.0`) and the table can be tested field by field. The
dataclasses still check their cross-field conditions (min_lr <= lr, ...) themselves.
Fields that take any value of their type (seeds, paths, names, flags) are listed in
`FREE_FIELDS`, so a new numeric or string field must be given a rule or said to be free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gad_megatron.config.schema import (
    AGG_MODES, D_KINDS, ENGINES, JUDGED_TASKS, KL_KINDS, POLICY_LOSSES, REWARD_SOURCES)
from gad_megatron.data.config import BAD_ROW_POLICIES, FORMATS, LENGTH_POLICIES, TEMPLATES
from gad_megatron.models.optim import DECAY_STYLES
from gad_megatron.models.perf import RECOMPUTE


@dataclass(frozen=True)
class Range:
    """A closed or open interval; None is unbounded on that side."""

    lo: float | None = None
    """Lower bound."""
    lo_open: bool = False
    """The lower bound itself is excluded."""
    hi: float | None = None
    """Upper bound."""
    hi_open: bool = False
    """The upper bound itself is excluded."""

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None
        low_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return f"must be {self.describe()}, got {value!r}" if low_bad or high_bad else None

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")

    def outside(self) -> list[float]:
        """Values just outside the range (for tests)."""
        out = []
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1)
        return out


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings."""

    values: tuple[str, ...]
    """The allowed values."""

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else f"{value!r} is not one of {list(self.values)}"

    def outside(self) -> list[str]:
        return ["no-such-" + self.values[0]]


@dataclass(frozen=True)
class NonEmpty:
    """A string that must not be empty (a column or experiment name)."""

    def problem(self, value: Any) -> str | None:
        return "must not be empty" if not str(value).strip() else None

    def outside(self) -> list[str]:
        return ["", "  "]


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, lo_open=True)
UNIT, UNIT_OPEN_LOW, BETA = Range(0, hi=1), Range(0, True, 1), Range(0, hi=1, hi_open=True)

RULES: dict[tuple[str, str], Range | Choice | NonEmpty] = {
    ("RunConfig", "num_cpus"): AT_LEAST_0,
    ("RunConfig", "worker_timeout_s"): POSITIVE,
    **{("TrainConfig", k): AT_LEAST_0 for k in ("steps", "d_only_steps", "save_every",
                                                 "gad_d_only_steps")},
    **{("TrainConfig", k): AT_LEAST_1 for k in ("epochs", "prompts_per_step", "keep_last",
                                                 "max_skipped_steps")},
    ("ModelConfig", "dtype"): Choice(("float32", "bfloat16", "float16")),
    ("ModelConfig", "tiny_layers"): AT_LEAST_1,
    ("ModelConfig", "tiny_hidden"): AT_LEAST_1,
    ("ModelConfig", "tiny_head_dim"): AT_LEAST_1,
    ("DataConfig", "format"): Choice(FORMATS),
    ("DataConfig", "template"): Choice(TEMPLATES),
    ("DataConfig", "prompt_len_policy"): Choice(LENGTH_POLICIES),
    ("DataConfig", "response_len_policy"): Choice(LENGTH_POLICIES),
    ("DataConfig", "on_bad_row"): Choice(BAD_ROW_POLICIES),
    ("DataConfig", "response_field"): NonEmpty(),
    ("DataConfig", "id_field"): NonEmpty(),
    ("DataConfig", "max_prompt_len"): AT_LEAST_1,
    ("DataConfig", "max_response_len"): Range(2),  # room for one token besides EOS
    ("DataConfig", "max_reported_errors"): AT_LEAST_0,
    ("DataConfig", "read_batch_rows"): AT_LEAST_1,
    ("DataConfig", "prompts_per_batch"): AT_LEAST_1,
    **{("ParallelLayout", k): AT_LEAST_1 for k in ("tp", "pp", "dp")},
    ("OptimConfig", "lr"): POSITIVE,
    **{("OptimConfig", k): AT_LEAST_0 for k in ("min_lr", "weight_decay", "clip_grad",
                                                 "warmup_steps")},
    ("OptimConfig", "adam_beta1"): BETA,
    ("OptimConfig", "adam_beta2"): BETA,
    ("OptimConfig", "adam_eps"): POSITIVE,
    ("OptimConfig", "decay_steps"): AT_LEAST_1,
    ("OptimConfig", "decay_style"): Choice(DECAY_STYLES),
    ("ActorConfig", "micro_batch_tokens"): AT_LEAST_1,
    ("ActorConfig", "policy_loss"): Choice(POLICY_LOSSES),
    ("ActorConfig", "clip_low"): AT_LEAST_0,
    ("ActorConfig", "clip_high"): AT_LEAST_0,
    ("ActorConfig", "dual_clip"): Range(1, lo_open=True),
    ("ActorConfig", "loss_agg"): Choice(AGG_MODES),
    ("ActorConfig", "kl_coef"): AT_LEAST_0,
    ("ActorConfig", "kl_kind"): Choice(KL_KINDS),
    ("ActorConfig", "ppo_epochs"): AT_LEAST_1,
    ("ActorConfig", "mini_batch_prompts"): AT_LEAST_1,
    ("DiscriminatorConfig", "mini_batch_prompts"): AT_LEAST_1,
    ("DiscriminatorConfig", "micro_batch_tokens"): AT_LEAST_1,
    ("DiscriminatorConfig", "head_init_std"): POSITIVE,
    ("DiscriminatorConfig", "bt_temperature"): POSITIVE,
    # A negative margin would reward D for ranking the student above the teacher.
    ("DiscriminatorConfig", "bt_margin"): AT_LEAST_0,
    ("DiscriminatorConfig", "score_reg_weight"): AT_LEAST_0,
    ("DiscriminatorConfig", "score_reg_threshold"): AT_LEAST_0,
    ("DiscriminatorConfig", "updates_per_step"): AT_LEAST_1,
    ("DiscriminatorConfig", "tiny_layers"): AT_LEAST_1,
    ("DiscriminatorConfig", "kind"): Choice(D_KINDS),
    ("DiscriminatorConfig", "log_ratio_beta"): POSITIVE,
    ("DiscriminatorConfig", "tiny_hidden"): AT_LEAST_1,
    ("DiscriminatorConfig", "negatives_per_kind"): AT_LEAST_1,
    ("RewardConfig", "source"): Choice(REWARD_SOURCES),
    ("RewardConfig", "task"): Choice(JUDGED_TASKS),
    ("ReferenceConfig", "micro_batch_tokens"): AT_LEAST_1,
    ("RolloutConfig", "engine"): Choice(ENGINES),
    **{("RolloutConfig", k): AT_LEAST_1 for k in ("tp", "n", "max_new_tokens", "bucket_mb")},
    ("RolloutConfig", "temperature"): POSITIVE,
    ("RolloutConfig", "top_p"): UNIT_OPEN_LOW,
    ("RolloutConfig", "gpu_memory_utilization"): UNIT_OPEN_LOW,
    ("RolloutConfig", "max_staleness"): Range(0, hi=1),  # 0 on-policy, 1 one step behind
    ("TrackingConfig", "experiment"): NonEmpty(),
    **{("TrackingConfig", k): AT_LEAST_0 for k in ("samples_every", "plots_every", "retry_s",
                                                    "http_max_retries", "length_ratio_min")},
    **{("TrackingConfig", k): UNIT for k in ("d_acc_low", "d_acc_high", "clip_frac_low",
                                              "clip_frac_high")},
    ("TrackingConfig", "d_acc_patience"): AT_LEAST_1,
    ("TrackingConfig", "http_timeout_s"): AT_LEAST_1,
    ("TrackingConfig", "score_gap_max"): POSITIVE,
    ("TrackingConfig", "length_ratio_max"): POSITIVE,
    ("TrackingConfig", "health_window"): AT_LEAST_1,
    **{("TrackingConfig", k): AT_LEAST_0 for k in ("length_drift_tol", "reward_divergence_min",
                                                    "d_loss_flat_tol")},
    **{("TrackingConfig", k): UNIT for k in ("d_collapse_tol", "d_collapse_from")},
    ("DiscriminatorConfig", "normalize_eps"): POSITIVE,
    ("DiscriminatorConfig", "adaptive_temp_scale"): AT_LEAST_0,
    ("DiscriminatorConfig", "adaptive_temp_min"): POSITIVE,
    ("DiscriminatorConfig", "adaptive_temp_max"): POSITIVE,
    ("PerfConfig", "recompute"): Choice(RECOMPUTE),
    ("PerfConfig", "recompute_num_layers"): AT_LEAST_1,
    ("PerfConfig", "context_parallel"): AT_LEAST_1,
}
"""(dataclass name, field) -> the rule its value must pass."""

FREE_FIELDS: frozenset[tuple[str, str]] = frozenset({
    ("RunConfig", "out_dir"), ("RunConfig", "ray_address"), ("TrainConfig", "init_from"),
    ("TrainConfig", "seed"), ("ModelConfig", "hf_path"), ("DataConfig", "seed"),
    ("DataConfig", "tokenizer"), ("DataConfig", "eos_token"),
    ("TrackingConfig", "tracking_uri"), ("TrackingConfig", "run_name"),
})
"""Numeric and string fields that take any value of their type (seeds, paths, names)."""

# Other spellings users bring from other trainers; a misspelling of these suggests ours.
ALIASES: dict[str, str] = {
    "learning_rate": "lr", "grad_clip": "clip_grad", "max_grad_norm": "clip_grad",
    "tensor_parallel": "tp", "tensor_model_parallel_size": "tp",
    "pipeline_parallel": "pp", "pipeline_model_parallel_size": "pp",
    "data_parallel": "dp", "num_samples": "n", "samples_per_prompt": "n",
    "max_steps": "steps", "num_epochs": "epochs", "batch_size": "prompts_per_step",
}


def check_value(owner: str, name: str, value: Any) -> str | None:
    """Why `value` is not allowed for `owner.name`, or None when it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    rule = RULES.get((owner, name))
    return None if rule is None else rule.problem(value)


def credential_problem(value: Any) -> str | None:
    """Why a job config must not hold `value` (a URI password or a token), or None.

    Checked by `load_config` on the resolved job config only: the config is written to the
    run directory and logged as an MLflow artifact, so a credential in it would be stored
    in plain text twice. (Configs of earlier runs are still read back as they are.)"""
    from gad_megatron.tracking.redact import redact_uri

    if not isinstance(value, str) or redact_uri(value) == value:
        return None
    return (f"holds a password or token ({redact_uri(value)}); give credentials in the "
            f"environment instead (MLflow: MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)")


def suggest(name: str, known: list[str]) -> str | None:
    """The known key a misspelled `name` most likely meant."""
    import difflib

    candidates = {k: k for k in known}
    candidates.update({a: k for a, k in ALIASES.items() if k in known})
    close = difflib.get_close_matches(name.lower(), list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None
