"""Perf settings and the decisions made from them (issue 14, defects 10 and 12): tables."""

from __future__ import annotations

import pytest

from gad_megatron.models.perf import (
    LocalSpecRefused, PerfConfig, ddp_kwargs, transformer_kwargs, use_te_spec)


@pytest.mark.parametrize("cuda,te,use_te,allow,want", [
    (False, False, None, False, False),  # CPU: the local spec, as always
    (True, True, None, False, True),  # GPU with TE: TE's spec
    (True, False, None, True, False),  # GPU without TE, asked for: local spec
    (False, True, None, False, False),  # TE importable but no GPU: local
    (True, True, False, False, False),  # said explicitly
])
def test_te_spec_choice(cuda, te, use_te, allow, want):
    assert use_te_spec(cuda, te, use_te, allow) is want


def test_cuda_without_te_is_refused_unless_asked():
    # Before: a silent fallback to the local spec, out of memory at 3.5K tokens.
    with pytest.raises(LocalSpecRefused, match=r"\[B, heads/tp, T, T\].*allow_local_spec"):
        use_te_spec(True, False, None, False)
    with pytest.raises(LocalSpecRefused, match="not importable"):
        use_te_spec(True, False, True, True)


@pytest.mark.parametrize("perf,tp,cuda,te,want", [
    (PerfConfig(), 1, False, False, {"sequence_parallel": False, "apply_rope_fusion": False,
                                     "gradient_accumulation_fusion": False}),
    # fusions default on where TE runs on a GPU
    (PerfConfig(), 2, True, True, {"sequence_parallel": False, "apply_rope_fusion": True,
                                   "gradient_accumulation_fusion": True}),
    (PerfConfig(rope_fusion=False), 2, True, True,
     {"sequence_parallel": False, "apply_rope_fusion": False,
      "gradient_accumulation_fusion": True}),
    (PerfConfig(sequence_parallel=True, recompute="selective"), 4, True, True,
     {"sequence_parallel": True, "apply_rope_fusion": True,
      "gradient_accumulation_fusion": True, "recompute_granularity": "selective"}),
    (PerfConfig(sequence_parallel=True, recompute="full", recompute_num_layers=2), 1, False,
     False, {"sequence_parallel": False, "apply_rope_fusion": False,
             "gradient_accumulation_fusion": False, "recompute_granularity": "full",
             "recompute_method": "uniform", "recompute_num_layers": 2}),
])
def test_transformer_kwargs_table(perf, tp, cuda, te, want):
    assert transformer_kwargs(perf, tp, cuda, te) == want


def test_refusals():
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        transformer_kwargs(PerfConfig(sequence_parallel=True), 2, False, False)
    with pytest.raises(ValueError, match="context_parallel=2: only 1"):
        PerfConfig(context_parallel=2)
    with pytest.raises(ValueError, match="recompute must be one of"):
        PerfConfig(recompute="some")
    assert ddp_kwargs(PerfConfig(overlap_grad_reduce=True)) == {"overlap_grad_reduce": True}


def test_perf_is_set_per_role_from_the_command_line():
    from gad_megatron.config.loader import build, parse_overrides
    from gad_megatron.config.schema import GADConfig

    cfg = build(GADConfig, parse_overrides([
        "actor.perf.recompute=selective", "actor.perf.rope_fusion=false",
        "discriminator.perf.overlap_grad_reduce=true", "reference.perf.allow_local_spec=true"]))
    assert cfg.actor.perf == PerfConfig(recompute="selective", rope_fusion=False)
    assert cfg.discriminator.perf.overlap_grad_reduce and cfg.reference.perf.allow_local_spec


@pytest.mark.parametrize("name", ["paper_warmup", "paper_gad"])
def test_paper_configs_shard_the_optimizer_where_dp_allows(name):
    from pathlib import Path

    from gad_megatron.config import load_config

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    # rollout.engine=hf: vLLM is not installed here; everything else is the file's.
    cfg = load_config(path, ["rollout.engine=hf"])
    assert cfg.actor.parallel.dp == 2 and cfg.actor.optim.use_distributed_optimizer
    assert cfg.actor.optim.lr == 1e-6 and cfg.actor.optim.clip_grad == 0.2  # paper values kept
    assert cfg.actor.perf.overlap_grad_reduce
    assert cfg.discriminator.optim.use_distributed_optimizer
