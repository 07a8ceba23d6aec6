"""Tiny random Hugging Face models, built and saved by the tests themselves (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3")
VOCAB = 100  # not a multiple of 128: exercises Megatron's vocab padding and its stripping


def hf_config(family: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "llama":
        # Llama 3.1-style rope scaling, with non-default frequency factors.
        cfg = tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1000000.0)
    elif family == "qwen3":
        # head_dim 16 differs from hidden/heads = 8, as in real Qwen3 models.
        cfg = tf.Qwen3Config(**common, head_dim=16, rope_theta=1000000.0)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_hf_model(family: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Build a random tiny HF model of `family` and save it (safetensors) to `out_dir`."""
    import transformers as tf

    cfg = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # norms start at 1.0; perturb them so a mis-mapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def small_run_args(tmp_path, name: str, stage: str, *overrides: str) -> list[str]:
    """The `key=value` overrides of `small_run` (for the CLI: configs/default.yaml + these)."""
    from gad_megatron.data.task import write_task

    task = tmp_path / "task"
    if not (task / "train.jsonl").exists():
        write_task(task, n_train=64, n_test=8, seed=0)
    return [f"run.out_dir={tmp_path / name}", f"train.stage={stage}", "train.prompts_per_step=4",
            "train.save_every=0", f"data.train_files={task / 'train.jsonl'}",
            f"data.eval_files={task / 'test.jsonl'}", "rollout.n=2", "model.tiny_hidden=32",
            *overrides]


def small_run(tmp_path, name: str, stage: str, *overrides: str):
    """A GADConfig for a short run of the embedded default on a small built-in task (the
    task files are written once per test directory); later overrides win."""
    from gad_megatron.config import load_config

    return load_config("configs/default.yaml",
                       small_run_args(tmp_path, name, stage, *overrides))
