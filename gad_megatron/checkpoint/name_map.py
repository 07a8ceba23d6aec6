"""The HF <-> Megatron parameter table, with the split/merge rule of each entry.

One row per Megatron parameter (global layer numbering, full tensor): the HF tensors it is
made of, how one TP rank's shard is cut from them, and how shards merge back. The same table
serves the local layer spec and Transformer Engine's (which fuses the pre-attention and pre-MLP
norms into the following linear layer, hence `te_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import torch

from gad_megatron.models.hf_config import HFArch

LAYER = "{layer}"


@dataclass(frozen=True)
class Rule:
    """How one Megatron parameter maps to HF tensors."""

    megatron: str
    """Megatron name under the local spec; `{layer}` is the global 0-based layer index."""
    hf: tuple[str, ...]
    """HF tensor names it is built from, in the order the split rule expects."""
    split: str
    """'replicated' | 'vocab' (dim 0, padded) | 'column' (dim 0) | 'row' (dim 1) |
    'qkv' (per-KV-group interleave, then dim 0) | 'gate_up' (each of gate/up on dim 0)."""
    te_name: str | None = None
    """Name under the Transformer Engine spec, when it differs."""
    when: str | None = None
    """Architecture flag that must hold for the row to apply: 'qkv_bias', 'qk_norm', 'untied'."""


TABLE: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.layers.{layer}.input_layernorm.weight",
         ("model.layers.{layer}.input_layernorm.weight",), "replicated",
         te_name="decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight"),
    Rule("decoder.layers.{layer}.self_attention.linear_qkv.weight",
         ("model.layers.{layer}.self_attn.q_proj.weight", "model.layers.{layer}.self_attn.k_proj.weight",
          "model.layers.{layer}.self_attn.v_proj.weight"), "qkv"),
    Rule("decoder.layers.{layer}.self_attention.linear_qkv.bias",
         ("model.layers.{layer}.self_attn.q_proj.bias", "model.layers.{layer}.self_attn.k_proj.bias",
          "model.layers.{layer}.self_attn.v_proj.bias"), "qkv", when="qkv_bias"),
    Rule("decoder.layers.{layer}.self_attention.q_layernorm.weight",
         ("model.layers.{layer}.self_attn.q_norm.weight",), "replicated", when="qk_norm"),
    Rule("decoder.layers.{layer}.self_attention.k_layernorm.weight",
         ("model.layers.{layer}.self_attn.k_norm.weight",), "replicated", when="qk_norm"),
    Rule("decoder.layers.{layer}.self_attention.linear_proj.weight",
         ("model.layers.{layer}.self_attn.o_proj.weight",), "row"),
    Rule("decoder.layers.{layer}.pre_mlp_layernorm.weight",
         ("model.layers.{layer}.post_attention_layernorm.weight",), "replicated",
         te_name="decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight"),
    Rule("decoder.layers.{layer}.mlp.linear_fc1.weight",
         ("model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"),
         "gate_up"),
    Rule("decoder.layers.{layer}.mlp.linear_fc2.weight",
         ("model.layers.{layer}.mlp.down_proj.weight",), "row"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)

# Megatron keeps these on the module but they are not weights (TE's FP8 metadata).
IGNORED_MEGATRON_SUFFIXES = ("._extra_state",)
# HF files sometimes carry non-parameter buffers; they are dropped on load, never exported.
IGNORED_HF_PATTERNS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def _applies(rule: Rule, arch: HFArch) -> bool:
    flags = {"qkv_bias": arch.attention_bias, "qk_norm": arch.qk_norm,
             "untied": not arch.tie_word_embeddings}
    return rule.when is None or flags[rule.when]


def rules_for(arch: HFArch) -> list[Rule]:
    """The table rows that apply to this architecture."""
    return [r for r in TABLE if _applies(r, arch)]


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name).replace(re.escape(LAYER), r"(\d+)") + "$")


@dataclass(frozen=True)
class Match:
    """A Megatron parameter name resolved against the table."""

    rule: Rule
    layer: int | None

    def hf_names(self) -> tuple[str, ...]:
        return tuple(n.replace(LAYER, str(self.layer)) for n in self.rule.hf)


def match_megatron(name: str, arch: HFArch, layer_offset: int = 0,
                   tied_output: bool = False) -> Match:
    """Resolve a local Megatron parameter name (local layer index + `layer_offset`).

    `tied_output`: the last pipeline stage's copy of a tied embedding (`output_layer.weight`
    with tie_word_embeddings) maps to the embedding's HF tensor.
    """
    if tied_output and name == "output_layer.weight":
        return Match(TABLE[0], None)
    for rule in rules_for(arch):
        for candidate in filter(None, (rule.megatron, rule.te_name)):
            m = _pattern(candidate).match(name)
            if m:
                layer = int(m.group(1)) + layer_offset if m.groups() else None
                return Match(rule, layer)
    raise KeyError(f"Megatron parameter {name!r} has no entry in the HF name table "
                   f"for {arch.architecture}")


def expected_hf_shapes(arch: HFArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the checkpoint must hold, with its shape."""
    h, hd = arch.hidden_size, arch.head_dim
    shapes = {
        "embed_tokens.weight": (arch.vocab_size, h), "lm_head.weight": (arch.vocab_size, h),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (arch.num_heads * hd, h), "k_proj.weight": (arch.num_kv_heads * hd, h),
        "v_proj.weight": (arch.num_kv_heads * hd, h), "q_proj.bias": (arch.num_heads * hd,),
        "k_proj.bias": (arch.num_kv_heads * hd,), "v_proj.bias": (arch.num_kv_heads * hd,),
        "q_norm.weight": (hd,), "k_norm.weight": (hd,), "o_proj.weight": (h, arch.num_heads * hd),
        "gate_proj.weight": (arch.intermediate_size, h), "up_proj.weight": (arch.intermediate_size, h),
        "down_proj.weight": (h, arch.intermediate_size), "norm.weight": (h,),
    }
    out: dict[str, tuple[int, ...]] = {}
    for rule in rules_for(arch):
        layers = range(arch.num_layers) if LAYER in rule.megatron else [None]
        for layer in layers:
            for name in Match(rule, layer).hf_names():
                out[name] = shapes[".".join(name.split(".")[-2:])]  # e.g. 'q_proj.weight'
    return out


# ---------------------------------------------------------------------------------------------
# Split (HF full tensors -> one TP rank's shard) and merge (all TP shards -> HF full tensors)
# ---------------------------------------------------------------------------------------------


def _qkv_groups(arch: HFArch, q, k, v) -> torch.Tensor:
    # Megatron stores QKV per KV group: [q heads of group g..., k_g, v_g] for g in groups.
    g, hd = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // g
    tail = q.shape[1:]
    return torch.cat([q.reshape(g, per * hd, *tail), k.reshape(g, hd, *tail),
                      v.reshape(g, hd, *tail)], dim=1)  # [g, (per+2)*hd, ...]


def split_for_rank(rule: Rule, arch: HFArch, hf: list[torch.Tensor], tp_rank: int, tp: int,
                   padded_vocab: int) -> torch.Tensor:
    """Cut this TP rank's shard of a Megatron parameter out of its HF tensors."""
    if rule.split == "replicated":
        return hf[0]
    if rule.split == "vocab":
        full = hf[0]
        pad = padded_vocab - full.shape[0]
        if pad:
            full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
        return full.chunk(tp, dim=0)[tp_rank]
    if rule.split == "column":
        return hf[0].chunk(tp, dim=0)[tp_rank]
    if rule.split == "row":
        return hf[0].chunk(tp, dim=1)[tp_rank]
    if rule.split == "qkv":
        groups = _qkv_groups(arch, *hf).chunk(tp, dim=0)[tp_rank]
        return groups.reshape(-1, *hf[0].shape[1:])
    if rule.split == "gate_up":
        gate, up = (t.chunk(tp, dim=0)[tp_rank] for t in hf)
        return torch.cat([gate, up], dim=0)
    raise ValueError(f"unknown split rule {rule.split!r}")


def merge_shards(rule: Rule, arch: HFArch, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rebuild the HF tensors (in `rule.hf` order) from every TP rank's shard."""
    if rule.split == "replicated":
        return [shards[0]]
    if rule.split == "vocab":
        return [torch.cat(shards, dim=0)[: arch.vocab_size]]
    if rule.split == "column":
        return [torch.cat(shards, dim=0)]
    if rule.split == "row":
        return [torch.cat(shards, dim=1)]
    if rule.split == "qkv":
        g, hd = arch.num_kv_heads, arch.head_dim
        per = arch.num_heads // g
        full = torch.cat(shards, dim=0)
        tail = full.shape[1:]
        grouped = full.reshape(g, (per + 2) * hd, *tail)
        q, k, v = grouped.split([per * hd, hd, hd], dim=1)
        return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]
    if rule.split == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    raise ValueError(f"unknown split rule {rule.split!r}")

