"""The job config: typed overrides, and one clear refusal per bad setting, before any worker."""

from __future__ import annotations

import pytest
import yaml

from gad_megatron.__main__ import main
from gad_megatron.config import ConfigError, Stage, check_against_model, flatten, load_config, to_dict
from gad_megatron.models.hf_config import parse_hf_config
from tests.tiny_models import hf_config


def test_defaults_are_the_papers_settings():
    cfg = load_config(None)
    assert cfg.train.stage == Stage.WARMUP
    assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.rollout.temperature) == (256, 8, 0.8)
    assert cfg.actor.optim.lr == cfg.discriminator.optim.lr == 1e-6
    assert cfg.actor.optim.clip_grad == 0.2
    assert (cfg.actor.kl_coef, cfg.actor.kl_kind) == (0.001, "low_var_kl")
    assert (cfg.train.d_only_steps, cfg.train.save_every) == (10, 50)
    assert cfg.rollout.max_new_tokens == 1536


def test_yaml_then_key_value_overrides_are_typed(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"train": {"steps": 7}, "actor": {"parallel": {"tp": 2}}}))
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump({"include": "base.yaml", "train": {"stage": "gad"}}))
    cfg = load_config(top, ["train.steps=9", "actor.optim.lr=1e-5", "rollout.n=4",
                            "discriminator.score_eos=false", "data.train_files=a.jsonl,b.jsonl"])
    assert cfg.train.stage == Stage.GAD and cfg.train.steps == 9
    assert cfg.actor.parallel.tp == 2 and cfg.actor.optim.lr == 1e-5
    assert cfg.discriminator.score_eos is False
    assert cfg.data.train_files == ("a.jsonl", "b.jsonl")
    assert flatten(to_dict(cfg))["actor.parallel.tp"] == 2


@pytest.mark.parametrize("overrides,message", [
    (["train.stage=distill"], "train.stage: 'distill' is not one of ['warmup', 'gad', 'seqkd']"),
    (["train.stage=gad", "rollout.n=1"], "rollout.n must be >= 2 in the gad stage"),
    # SGLang has no CPU build, so it is never installed on a CPU machine.
    (["rollout.engine=sglang"], "rollout.engine='sglang' needs the 'sglang' package, which is "
                                "not installed"),
    (["actor.optimizer.lr=1"], "unknown key 'optimizer' in actor; did you mean 'optim'?"),
    (["train.steps=ten"], "train.steps: expected int, got 'ten'"),
    (["actor.parallel.tp=0"], "actor.parallel.tp: must be >= 1, got 0"),
    (["actor.policy_loss=dpo"], "actor.policy_loss: 'dpo' is not one of ['gspo', 'ppo']"),
    (["trainsteps"], "override 'trainsteps' is not of the form key=value"),
    (["rollout.max_staleness=2"], "rollout.max_staleness: must be in [0, 1], got 2"),
    (["rollout.max_staleness=1", "run.colocate=true"],
     "rollout.max_staleness=1 overlaps generation with training, but run.colocate=true"),
])
def test_bad_settings_are_refused_with_one_message(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_tp_must_divide_the_head_counts():
    arch = parse_hf_config({**hf_config("llama").to_dict(), "architectures": ["LlamaForCausalLM"]})
    cfg = load_config(None, ["discriminator.parallel.tp=3"])
    with pytest.raises(ConfigError, match="discriminator.parallel: tp=3 does not divide "
                                          "num_attention_heads=4"):
        check_against_model(cfg, arch)


def test_print_config_shows_the_resolved_config(capsys):
    assert main(["train", "configs/default.yaml", "train.steps=3", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["steps"] == 3 and out["train"]["stage"] == "warmup"
    assert out["data"]["tokenizer"] == "builtin"


def test_cli_refusal_is_one_line(capsys):
    assert main(["train", "configs/default.yaml", "train.stage=nope"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.stage:")
