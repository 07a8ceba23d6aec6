"""Megatron (our builder + converter) vs transformers' own forward pass, for each family and
(tp, pp) in {(1,1), (2,1), (1,2)}: max |logits difference| <= 1e-4 in fp32."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_parallel
from tests.tiny_models import FAMILIES, hf_logits, make_hf_model


def gather_vocab(local: torch.Tensor, vocab: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab]


def megatron_logits(rank, model_dir, tokens, tp, pp):
    from megatron.core import parallel_state as ps

    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.models.builder import build_gpt
    from gad_megatron.models.forward import MicroBatch, run_schedule
    from gad_megatron.models.hf_config import read_hf_config

    arch = read_hf_config(model_dir)
    model = build_gpt(arch, tp, pp)
    load_hf_weights(model, arch, model_dir)
    model.eval()
    mbs = [MicroBatch(tokens[i:i + 1], torch.ones_like(tokens[i:i + 1], dtype=torch.bool), {})
           for i in range(tokens.shape[0])]
    with torch.no_grad():
        outs = run_schedule(model, mbs, lambda out, mb: gather_vocab(out, arch.vocab_size))
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        return torch.cat(outs)
    return None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_logits_match_transformers(tmp_path, family, tp, pp):
    model_dir = make_hf_model(family, tmp_path / family)
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(model_dir, tokens)
    results = run_parallel(megatron_logits, tp=tp, pp=pp, args=(model_dir, tokens, tp, pp))
    got = next(r for r in results if r is not None)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"{family} tp={tp} pp={pp}: max |diff| = {diff:.3e}"
