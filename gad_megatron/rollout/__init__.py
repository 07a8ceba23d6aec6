"""Rollout engines behind one protocol (`base.RolloutEngine`) and a factory.

'hf' (transformers, runs anywhere), 'vllm' and 'sglang' (GPU; imported only when asked for).
"""

from __future__ import annotations

import json
from pathlib import Path

from gad_megatron.rollout.base import Generation, RolloutEngine

ENGINE_KINDS = ("hf", "vllm", "sglang")


def make_engine(kind: str, hf_config: dict | str | Path, tp: int = 1, **opts) -> RolloutEngine:
    """Build a rollout engine.

    `hf_config`: an HF model directory (weights are loaded from it) or a config dict (random
    weights: the first weight sync fills them). vLLM and SGLang need a directory. `tp` is the
    engine's own tensor-parallel size; the HF engine runs on one device and accepts only 1.
    `opts` go to the engine's constructor (eos_id, pad_id, dtype, device,
    gpu_memory_utilization...).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown rollout engine {kind!r}; use one of {', '.join(ENGINE_KINDS)}")
    if kind == "hf":
        from gad_megatron.rollout.hf_engine import HFEngine

        if tp != 1:
            raise ValueError(f"the hf engine runs on one device; got tp={tp}")
        if isinstance(hf_config, dict):
            return HFEngine(hf_config, **opts)
        return HFEngine.from_pretrained(hf_config, **opts)
    if isinstance(hf_config, dict):
        raise ValueError(f"the {kind} engine loads a model directory; got a config dict")
    if not (Path(hf_config) / "config.json").is_file():
        raise FileNotFoundError(f"{hf_config}: no config.json")
    if kind == "vllm":
        from gad_megatron.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(str(hf_config), tp=tp, **opts)
    from gad_megatron.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(str(hf_config), tp=tp, **opts)


def read_config(path: str | Path) -> dict:
    """The config.json of an HF model directory, as a dict."""
    return json.loads((Path(path) / "config.json").read_text())


__all__ = ["ENGINE_KINDS", "Generation", "RolloutEngine", "make_engine", "read_config"]
