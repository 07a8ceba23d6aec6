"""Load a GAD job config: defaults <- YAML file(s) <- `key=value` overrides, then validate."""

from __future__ import annotations

from pathlib import Path

from gad_megatron.config.loader import (
    ConfigError, build, flatten, merge, parse_overrides, read_yaml, to_dict)
from gad_megatron.config.schema import (
    ActorConfig, DiscriminatorConfig, GADConfig, ModelConfig, ParallelConfig, ReferenceConfig,
    RewardConfig, RolloutConfig, RunConfig, Stage, TrainConfig)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> GADConfig:
    """The resolved, validated config of a job. Raises ConfigError naming the bad key."""
    from gad_megatron.config.rules import credential_problem

    tree = read_yaml(path) if path else {}
    tree = merge(tree, parse_overrides(list(overrides)))
    cfg = build(GADConfig, tree)
    for key, value in flatten(to_dict(cfg)).items():
        values = value if isinstance(value, list) else [value]
        problem = next((p for v in values if (p := credential_problem(v))), None)
        if problem:
            raise ConfigError(f"{key}: {problem}")
    return cfg


# vLLM 0.32's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_against_model(cfg: GADConfig, arch) -> None:
    """Refuse parallel layouts that cannot split this architecture (before workers start)."""
    from gad_megatron.models.hf_config import check_parallel

    roles = {"actor": cfg.actor.parallel, "discriminator": cfg.discriminator.parallel,
             "reference": cfg.reference.parallel}
    for role, par in roles.items():
        try:
            check_parallel(arch, par.tp, par.pp)
        except ValueError as exc:
            raise ConfigError(f"{role}.parallel: {exc}") from None
    if cfg.rollout.engine == "vllm" and arch.head_dim not in VLLM_CPU_HEAD_DIMS:
        import torch

        if not torch.cuda.is_available():
            where = "model.tiny_head_dim" if not cfg.model.hf_path else cfg.model.hf_path
            raise ConfigError(f"rollout.engine=vllm: vLLM's CPU attention takes head_dim in "
                              f"{list(VLLM_CPU_HEAD_DIMS)}, and {where} gives {arch.head_dim}")
    if cfg.rollout.engine != "hf" and arch.num_heads % cfg.rollout.tp:
        raise ConfigError(f"rollout.tp={cfg.rollout.tp} does not divide "
                          f"num_attention_heads={arch.num_heads}")


__all__ = [
    "ActorConfig", "ConfigError", "DiscriminatorConfig", "GADConfig", "ModelConfig",
    "ParallelConfig", "ReferenceConfig", "RewardConfig", "RolloutConfig", "RunConfig", "Stage",
    "TrainConfig",
    "check_against_model", "flatten", "load_config", "to_dict",
]
