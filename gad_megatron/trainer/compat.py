"""Whether a checkpoint can be continued under a config, decided before anything is written.

A resumed run (or a gad/seqkd stage started from `train.init_from`) loads weights of the
shape they were saved at. A config that asks for another architecture or tokenizer would
otherwise train on with the old model while `config.json` and MLflow record the new one, or
die inside dist_checkpointing on the first mismatched tensor. As Megatron-LM's
checkpoint-args check does, each key that differs is named with its old and new value.

What may change on resume is left alone here: learning rates, steps, logging and the
parallel layout (checkpoints load at any TP/PP). The tracker records those as changed params.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gad_megatron.config import GADConfig, Stage, to_dict
from gad_megatron.config.loader import flatten
from gad_megatron.models.hf_config import HFArch, parse_hf_config

FIXED_ON_RESUME = ("model.hf_path", "data.tokenizer", "discriminator.kind")
"""Config keys a resumed run may not change: they choose the weights' shape or meaning. The
embedded student's `model.tiny_*` join them when model.hf_path is empty, and the
discriminator's own `discriminator.tiny_*` in the warmup stage (gad takes D from init_from)."""
TINY_KEYS = ("model.tiny_layers", "model.tiny_hidden", "model.tiny_head_dim")
D_TINY_KEYS = ("discriminator.tiny_layers", "discriminator.tiny_hidden")


class IncompatibleCheckpoint(ValueError):
    """A checkpoint's model differs from the one the config asks for."""


def arch_changes(old: HFArch, new: HFArch) -> list[str]:
    """`field old -> new` for each architecture field that differs."""
    return [f"{f.name} {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
            for f in dataclasses.fields(HFArch)
            if f.name != "raw" and getattr(old, f.name) != getattr(new, f.name)]


def config_changes(previous: dict, cfg: GADConfig) -> list[str]:
    """`key old -> new` for each key of FIXED_ON_RESUME (and the tiny shapes in use) that the
    config changed from the run's `config.json` (`previous`)."""
    old, new = flatten(previous), flatten(to_dict(cfg))
    keys = FIXED_ON_RESUME + (() if cfg.model.hf_path else TINY_KEYS) + (
        D_TINY_KEYS if cfg.train.stage == Stage.WARMUP else ())
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _saved_arch(role_dir: Path) -> HFArch:
    from gad_megatron.checkpoint.megatron_ckpt import read_checkpoint_meta

    return read_checkpoint_meta(role_dir)[1]


def check_resume(cfg: GADConfig, ckpt: Path, previous: dict | None,
                 requested: dict) -> None:
    """Refuse to resume `ckpt` when the config changed what the weights are.

    `requested`: the HF config dict of the student the config asks for."""
    changes = config_changes(previous, cfg) if previous else []
    changes += arch_changes(_saved_arch(ckpt / "actor"), parse_hf_config(requested))
    if changes:
        raise IncompatibleCheckpoint(
            f"{cfg.run.out_dir}: cannot resume from {ckpt.name}: the config asks for another "
            f"model than the run was trained with ({'; '.join(changes)}). Resume with the "
            "run's own settings, or choose another run.out_dir")


def check_init_from(cfg: GADConfig, ckpt: Path, requested: dict) -> None:
    """Refuse a `train.init_from` checkpoint whose student is not the model the config asks
    for (the gad/seqkd stage would load it into a model of another shape)."""
    changes = arch_changes(_saved_arch(ckpt / "actor"), parse_hf_config(requested))
    if changes:
        raise IncompatibleCheckpoint(
            f"train.init_from={cfg.train.init_from}: its student ({ckpt}) is not the model "
            f"this config asks for ({'; '.join(changes)}); use the model settings of that "
            "run (model.hf_path, model.tiny_*)")
