"""Bad input is refused by name, before any rank starts or any weight is copied."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import megatron_patches
from gad_megatron.__main__ import main
from gad_megatron.checkpoint.hf_io import CheckpointMismatch, HFTensorIndex
from gad_megatron.models.hf_config import (
    UnsupportedModelError, check_parallel, parse_hf_config, read_hf_config)
from tests.tiny_models import hf_config, make_hf_model


def cfg_dict(family="llama", **overrides):
    d = hf_config(family).to_dict()
    d["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[family]]
    d.update(overrides)
    return d


@pytest.mark.parametrize("overrides,message", [
    ({"architectures": ["MistralForCausalLM"]},
     "unsupported architecture 'MistralForCausalLM'; supported: LlamaForCausalLM, "
     "Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
     "unsupported rope scaling type 'yarn'; supported: default, linear, llama3"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'; supported: silu"),
    ({"attention_bias": True}, "unsupported setting attention_bias True"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
])
def test_unsupported_configs_are_refused_by_name(overrides, message):
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[")):
        parse_hf_config(cfg_dict(**overrides))


def test_transformers4_and_5_rope_layouts_agree():
    v4 = {k: v for k, v in cfg_dict().items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})
    v5 = {k: v for k, v in cfg_dict().items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = dict(v4["rope_scaling"], rope_theta=500000.0)
    assert parse_hf_config(v4).rope == parse_hf_config(v5).rope
    assert parse_hf_config(v4).rope.kind == "llama3"
    assert parse_hf_config(v4).rope.original_max_position_embeddings == 16


def test_parallel_sizes_that_do_not_divide_are_refused():
    arch = parse_hf_config(cfg_dict())
    with pytest.raises(ValueError, match="tp=3 does not divide num_attention_heads=4"):
        check_parallel(arch, 3, 1)
    with pytest.raises(ValueError, match="pp=3 does not divide num_hidden_layers=2"):
        check_parallel(arch, 1, 3)


def _rewrite(model_dir, edit):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)),
     "unexpected tensor 'model.layers.0.mlp.extra.weight'"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 32)),
     r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \[8, 32\], expected \[16, 32\]"),
])
def test_bad_checkpoint_tensors_are_named(tmp_path, edit, message):
    model_dir = make_hf_model("llama", tmp_path / "m")
    _rewrite(model_dir, edit)
    with pytest.raises(CheckpointMismatch, match=message):
        HFTensorIndex(model_dir).check_against(read_hf_config(model_dir))


def test_convert_cli_fails_with_one_clear_line(tmp_path, capsys):
    model_dir = make_hf_model("llama", tmp_path / "m")
    _rewrite(model_dir, lambda t: t.pop("model.norm.weight"))
    capsys.readouterr()  # drop transformers' own progress output from building the model
    rc = main(["convert", "hf-to-megatron", "--hf", str(model_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err == [f"error: {model_dir}: missing tensor 'model.norm.weight'"]
    assert not (tmp_path / "o").exists()

    rc = main(["convert", "hf-to-megatron", "--hf", str(model_dir), "--out", str(tmp_path / "o"),
               "--tp", "3"])
    assert rc != 0 and "tp=3 does not divide" in capsys.readouterr().err


def test_export_refuses_a_partial_checkpoint(tmp_path, capsys):
    partial = tmp_path / "ckpt"
    (partial / "model").mkdir(parents=True)
    rc = main(["convert", "megatron-to-hf", "--ckpt", str(partial), "--out", str(tmp_path / "o")])
    assert rc != 0
    assert "not a complete gad-megatron checkpoint" in capsys.readouterr().err


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="invalid JSON"):
        read_hf_config(tmp_path)


def test_patches_refuse_an_unknown_megatron_version(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(megatron_patches, "_applied", [])
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    with pytest.raises(megatron_patches.UnsupportedMegatronVersion,
                       match="supports megatron-core 0.16.1; found 0.99.0"):
        megatron_patches.apply(force=True)


def test_patches_are_listed_with_reasons():
    assert all(p.reason and p.target for p in megatron_patches.PATCHES)
    assert json.dumps([p.target for p in megatron_patches.PATCHES])
