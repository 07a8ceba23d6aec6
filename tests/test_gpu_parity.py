"""Parity with transformers on CUDA (NCCL, TP=1), in fp32 and bf16. Skipped without CUDA.

Run on a GPU machine with `make test-gpu` (or `pytest -m gpu`).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_parallel
from tests.tiny_models import make_hf_model

pytestmark = pytest.mark.gpu


def cuda_logits_rank(rank, model_dir, tokens, dtype_name):
    import torch.distributed as dist

    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.models.forward import MicroBatch, run_schedule
    from gad_megatron.models.hf_config import read_hf_config

    assert dist.get_backend() == "nccl"
    arch = read_hf_config(model_dir)
    model = build_gpt(arch, 1, 1, BuildOptions(dtype=getattr(torch, dtype_name))).cuda()
    load_hf_weights(model, arch, model_dir)
    tokens = tokens.cuda()
    mb = MicroBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), {})
    with torch.no_grad():
        (out,) = run_schedule(model, [mb], lambda o, mb: o[..., :arch.vocab_size].float().cpu())
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype_name,tol", [
    ("float32", 1e-4),
    # bf16 keeps 8 mantissa bits (unit roundoff 2^-9 ~ 2e-3). Each of the ~12 sequential
    # rounding points of a 2-layer model (norm, qkv, attention, proj, residual, MLP, head)
    # can add that relative error to O(1) activations, so logits of magnitude ~1-2 may differ
    # from the fp32 reference by up to ~12 * 2e-3 * 2 ~ 5e-2.
    ("bfloat16", 5e-2),
])
def test_cuda_logits_match_transformers(tmp_path, family, dtype_name, tol):
    import transformers as tf

    model_dir = make_hf_model(family, tmp_path / family)
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    with torch.no_grad():
        expected = ref_model(input_ids=tokens.cuda()).logits.float().cpu()
    (got,) = run_parallel(cuda_logits_rank, args=(model_dir, tokens, dtype_name))
    diff = (got - expected).abs().max().item()
    print(f"{family} {dtype_name}: max |logits diff| vs HF fp32 = {diff:.3e} (tol {tol})")
    assert diff <= tol
