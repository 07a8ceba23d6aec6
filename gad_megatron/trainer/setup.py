"""Everything a run needs before its first step: model files, tokenizer, data, weight sources."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gad_megatron.config import ConfigError, GADConfig, Stage, check_against_model
from gad_megatron.workers.common import WeightsSource

TINY_DIR = "init_model"
TINY_D_DIR = "init_discriminator"
"""The embedded default's D of its own shape (discriminator.tiny_*), when it has one."""


def tiny_hf_config(vocab_size: int, layers: int, hidden: int, eos_id: int, pad_id: int,
                   head_dim: int = 16) -> dict:
    """A small Qwen3-shaped student for the embedded default (GQA, q/k norm, RoPE)."""
    # 4 query heads over 2 KV groups (GQA), so TP=2 splits it; head_dim independent of
    # hidden/heads, as in Qwen3 (16 by default; vLLM's CPU attention needs 32 or more).
    heads = 4
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": hidden * 3,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": 2, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "float32",
        "eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": None,
    }


def _tiny_config(cfg: GADConfig, tokenizer, layers: int | None = None,
                 hidden: int | None = None) -> dict:
    """The embedded student's HF config (model.tiny_*, or `layers`/`hidden` for another)."""
    from gad_megatron.data import eos_id, pad_id

    head_dim = cfg.model.tiny_head_dim or (64 if cfg.rollout.engine == "vllm" else 16)
    return tiny_hf_config(len(tokenizer), layers or cfg.model.tiny_layers,
                          hidden or cfg.model.tiny_hidden, eos_id(tokenizer), pad_id(tokenizer),
                          head_dim)


def requested_hf_config(cfg: GADConfig) -> dict:
    """The HF config of the student `cfg` asks for, read or made without writing anything
    (the check of a resume or an init_from runs before the run directory is touched)."""
    from gad_megatron.data import load_tokenizer

    if cfg.model.hf_path:
        return _read_hf_config(Path(cfg.model.hf_path))
    return _tiny_config(cfg, load_tokenizer(cfg.data.tokenizer or "builtin"))


def write_tiny_model(out_dir: Path, cfg: GADConfig, tokenizer, layers: int | None = None,
                     hidden: int | None = None) -> Path:
    """Create (once) the embedded default's random student as an HF directory (`layers`,
    `hidden`: another shape than model.tiny_*, for a discriminator of its own)."""
    import torch
    import transformers as tf

    if (out_dir / "config.json").is_file():
        return out_dir
    hf = _tiny_config(cfg, tokenizer, layers, hidden)
    torch.manual_seed(cfg.train.seed)
    model = tf.AutoModelForCausalLM.from_config(tf.Qwen3Config(**hf))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


@dataclass
class RunInputs:
    """Resolved inputs of a run."""

    hf_dir: str
    """HF directory of the initial student (architecture, tokenizer)."""
    arch_config: dict
    tokenizer: Any
    pad_id: int
    eos_id: int
    actor: WeightsSource
    discriminator: WeightsSource | None
    reference: WeightsSource | None
    monitor: WeightsSource | None = None
    """gad with train.frozen_d_monitor: the starting discriminator, never updated."""


def latest_checkpoint(run_or_ckpt: str, what: str = "train.init_from") -> Path:
    """A complete checkpoint: `run_or_ckpt` itself, or the one a run's `latest` names."""
    from gad_megatron.trainer.checkpoints import checkpoint_of

    return checkpoint_of(run_or_ckpt, what)


def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.hf_path={hf_dir}: no config.json there (an HF model "
                          "directory is expected)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def _checked_d_arch(cfg: GADConfig, arch_config: dict) -> dict:
    """A discriminator's own HF config, refused when discriminator.parallel cannot split it."""
    from gad_megatron.models.hf_config import check_parallel, parse_hf_config

    par = cfg.discriminator.parallel
    try:
        check_parallel(parse_hf_config(arch_config), par.tp, par.pp)
    except ValueError as exc:
        raise ConfigError(f"discriminator.parallel: {exc}") from None
    return arch_config


def resolve_inputs(cfg: GADConfig) -> RunInputs:
    """Model directory, tokenizer and each role's initial weights, checked against the config."""
    from gad_megatron.data import eos_id, load_tokenizer, pad_id
    from gad_megatron.models.hf_config import parse_hf_config

    out = Path(cfg.run.out_dir)
    if cfg.model.hf_path:
        from gad_megatron.checkpoint.hf_io import safe_weights_dir

        hf_dir = Path(cfg.model.hf_path)
        tokenizer = load_tokenizer(cfg.data.tokenizer or str(hf_dir))
        # Pickle-only weights: refused, or (model.allow_pickle) a safetensors copy is used.
        hf_dir = safe_weights_dir(hf_dir, out / "hf_weights", cfg.model.allow_pickle)
    else:
        tokenizer = load_tokenizer(cfg.data.tokenizer or "builtin")
        hf_dir = write_tiny_model(out / TINY_DIR, cfg, tokenizer)
    arch_config = _read_hf_config(hf_dir)
    arch = parse_hf_config(arch_config)
    check_against_model(cfg, arch)
    if cfg.model.hf_path:  # headers only: a damaged file fails here, not in a worker
        from gad_megatron.checkpoint.hf_io import HFTensorIndex

        HFTensorIndex(hf_dir).check_against(arch)
    dtype = cfg.model.dtype
    actor = WeightsSource(str(hf_dir), arch_config, dtype)
    disc = WeightsSource(str(hf_dir), arch_config, dtype)
    d_cfg = cfg.discriminator
    if d_cfg.tiny_layers or d_cfg.tiny_hidden:  # a D of its own shape, random weights
        d_dir = write_tiny_model(out / TINY_D_DIR, cfg, tokenizer, d_cfg.tiny_layers,
                                 d_cfg.tiny_hidden)
        disc = WeightsSource(str(d_dir), _checked_d_arch(cfg, _read_hf_config(d_dir)), dtype)
    if cfg.train.stage == Stage.GAD and not cfg.train.init_from:
        raise ConfigError("train.init_from must name the warmup run (or checkpoint) "
                          "that the gad stage starts from")
    if cfg.train.init_from and cfg.train.stage == Stage.WARMUP:
        raise ConfigError("train.init_from is for the gad and seqkd stages; warmup starts from "
                          "model.hf_path")
    if cfg.train.init_from:
        if not Path(cfg.train.init_from).exists():
            first = ("run the warmup stage first (`make warmup`): gad starts from its "
                     "checkpoint" if cfg.train.stage == Stage.GAD else "no such directory")
            raise ConfigError(f"train.init_from={cfg.train.init_from}: {first}")
        ckpt = latest_checkpoint(cfg.train.init_from)
        actor = WeightsSource(str(ckpt / "actor"), arch_config, dtype)
        if (ckpt / "discriminator").is_dir():  # its own architecture, as it was saved
            from gad_megatron.checkpoint.megatron_ckpt import read_checkpoint_meta

            d_arch = read_checkpoint_meta(ckpt / "discriminator")[1].raw
            disc = WeightsSource(str(ckpt / "discriminator"), _checked_d_arch(cfg, d_arch),
                                 dtype)
        elif cfg.train.stage == Stage.GAD:
            raise ConfigError(f"train.init_from={cfg.train.init_from!r}: checkpoint {ckpt} has "
                              "no discriminator (a seqkd run?); gad needs a warmup run")
    monitor = disc  # the frozen-D monitor is always the warmup's D
    if cfg.train.stage == Stage.GAD and cfg.discriminator.init_from_actor:
        # The warmed-up student's backbone; the worker keeps its fresh head.
        disc = dataclasses.replace(actor, backbone_only=True)
    return RunInputs(
        hf_dir=str(hf_dir), arch_config=arch_config, tokenizer=tokenizer,
        pad_id=pad_id(tokenizer), eos_id=eos_id(tokenizer, cfg.data.eos_token), actor=actor,
        discriminator=None if cfg.train.stage == Stage.SEQKD else disc,
        reference=actor if cfg.train.stage == Stage.GAD else None,
        monitor=monitor if cfg.train.stage == Stage.GAD and cfg.train.frozen_d_monitor else None)


def build_loader(cfg: GADConfig, tokenizer, report_dir: str | Path | None = None):
    """The training batches: validated dataset, group-aware deterministic loader. Rows a
    skip policy dropped are reported on the console and in `report_dir`/data_report.json."""
    from gad_megatron.data import GroupLoader, build_dataset

    data = cfg.data.replace(prompts_per_batch=cfg.train.prompts_per_step)
    if not data.train_files:
        raise ConfigError("data.train_files is empty: name the teacher-answer files "
                          "(or use configs/default.yaml, which builds the built-in task)")
    dataset = build_dataset(list(data.train_files), data, tokenizer)
    if dataset.stats.dropped:  # a skip policy dropped rows: say so, and keep the record
        print(f"data: {dataset.stats.dropped} rows skipped by the data.*_policy / on_bad_row "
              f"settings:\n{dataset.stats.dropped_report()}", flush=True)
        if report_dir is not None:
            Path(report_dir).mkdir(parents=True, exist_ok=True)
            (Path(report_dir) / "data_report.json").write_text(
                json.dumps(dataset.stats.to_dict(), indent=2))
    return GroupLoader.from_config(dataset, data)


def step_aids(cfg: GADConfig, inputs: RunInputs, dataset) -> dict[str, Any]:
    """What the steps use besides the roles: reward.task's acceptance test (`judge`) and,
    for 'splice' negatives, every teacher answer by prompt (`teacher_pool`); None when the
    config asks for neither. Keyword arguments of StepContext."""
    from gad_megatron.data.negatives import TeacherPool
    from gad_megatron.data.task_judge import TaskJudge

    judge = TaskJudge(cfg.reward.task, inputs.tokenizer, inputs.eos_id) if cfg.reward.task \
        else None
    pool = TeacherPool(dataset) if "splice" in cfg.discriminator.negatives else None
    return {"judge": judge, "teacher_pool": pool}
