"""Read a Hugging Face `config.json` into the architecture facts the Megatron builder needs.

Accepts configs written by transformers 4 (`rope_theta`, `rope_scaling`) and 5
(`rope_parameters`). Anything we cannot reproduce exactly is refused by name, with the list of
what is supported, so that a model never trains with silently different maths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# architecture name -> family; the family decides attention bias and q/k norm defaults.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or setting this project does not reproduce."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding settings, normalised across transformers 4 and 5 config layouts."""

    theta: float = 10000.0
    """Base of the rotary frequencies (`rope_theta`)."""
    kind: str = "default"
    """Scaling type: 'default' (none), 'linear' (position interpolation) or 'llama3'."""
    factor: float = 1.0
    """Scaling factor for 'linear' and 'llama3'."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths above original_max/low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths below original_max/high_freq_factor are left unchanged."""
    original_max_position_embeddings: int = 8192
    """llama3 only: the context length the base model was trained on."""


@dataclass(frozen=True)
class HFArch:
    """The architecture of one HF causal LM, as the Megatron builder and the converter use it."""

    architecture: str
    """HF class name, e.g. 'Qwen2ForCausalLM'."""
    family: str
    """'llama', 'qwen2' or 'qwen3'."""
    vocab_size: int
    """Rows of the HF embedding (unpadded)."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads: equal to num_heads (MHA), fewer (GQA) or 1 (MQA)."""
    head_dim: int
    """Per-head width; Qwen3 sets it explicitly and it may differ from hidden/heads."""
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    attention_bias: bool
    """Bias on q/k/v projections (Qwen2); never on o_proj for these families."""
    qk_norm: bool
    """RMSNorm on each head's q and k (Qwen3)."""
    max_position_embeddings: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The config.json as read, written back unchanged on export."""


def _refuse(what: str, value: Any, supported: Any) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported {what} {value!r}; supported: {supported}")


def _rope(cfg: dict[str, Any]) -> RopeSpec:
    # transformers 5 keeps theta and scaling together in `rope_parameters`; 4 splits them.
    params = cfg.get("rope_parameters")
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise _refuse("rope scaling type", kind, ", ".join(SUPPORTED_ROPE_TYPES))
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeSpec(theta=theta)
    factor = float(params.get("factor", 1.0))
    if kind == "linear":
        return RopeSpec(theta=theta, kind=kind, factor=factor)
    return RopeSpec(
        theta=theta, kind=kind, factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _check_settings(cfg: dict[str, Any], family: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise _refuse("hidden_act", act, ", ".join(SUPPORTED_ACTIVATIONS))
    if cfg.get("mlp_bias"):
        raise _refuse("setting mlp_bias", True, "mlp_bias=false")
    if family in ("llama", "qwen3") and cfg.get("attention_bias"):
        # For these families attention_bias also puts a bias on o_proj, which Megatron's
        # local spec only offers together with MLP biases; no released checkpoint uses it.
        raise _refuse("setting attention_bias", True, "attention_bias=false for Llama and Qwen3")
    if cfg.get("use_sliding_window") and family in ("qwen2", "qwen3"):
        raise _refuse("setting use_sliding_window", True, "use_sliding_window=false")
    if float(cfg.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise _refuse("attention_dropout", cfg["attention_dropout"], "0.0")


def parse_hf_config(cfg: dict[str, Any]) -> HFArch:
    """Validate an HF config dict and return its architecture; refuse what we can't reproduce."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise _refuse("architecture", archs[0] if len(archs) == 1 else archs,
                      ", ".join(SUPPORTED_ARCHITECTURES))
    arch = archs[0]
    family = SUPPORTED_ARCHITECTURES[arch]
    _check_settings(cfg, family)
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        result = HFArch(
            architecture=arch,
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=_rope(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias (and none on o_proj); the others are refused above.
            attention_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            raw=dict(cfg),
        )
    except KeyError as exc:
        raise UnsupportedModelError(f"config.json lacks required field {exc.args[0]!r}") from None
    if result.num_heads % result.num_kv_heads:
        raise UnsupportedModelError(
            f"num_attention_heads={result.num_heads} is not a multiple of "
            f"num_key_value_heads={result.num_kv_heads}"
        )
    return result


def read_hf_config(model_dir: str | Path) -> HFArch:
    """Read and validate `<model_dir>/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"{path}: invalid JSON ({exc})") from None
    try:
        return parse_hf_config(cfg)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from None


def check_parallel(arch: HFArch, tp: int, pp: int) -> None:
    """Refuse a (tp, pp) that cannot split this architecture evenly."""
    if arch.num_heads % tp:
        raise ValueError(f"tp={tp} does not divide num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp:
        raise ValueError(
            f"tp={tp} does not divide num_key_value_heads={arch.num_kv_heads} "
            "(KV-head replication across TP ranks is not supported)"
        )
    if arch.intermediate_size % tp:
        raise ValueError(f"tp={tp} does not divide intermediate_size={arch.intermediate_size}")
    if arch.num_layers % pp:
        raise ValueError(f"pp={pp} does not divide num_hidden_layers={arch.num_layers}")
