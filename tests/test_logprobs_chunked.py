"""Chunked log-probs (issue 14, defect 11): the chunked autograd function equals the direct
full-vocabulary computation, values and gradients, at any chunk size, at TP=1 and TP=2; and
what it keeps for the backward is its input plus a few floats per position, not several
fp32 full-vocabulary copies."""

from __future__ import annotations

import pytest
import torch

from gad_megatron.models.logprobs import vocab_parallel_logprobs
from tests.dist_utils import run_parallel

N_POS, VOCAB, PADDED = 7, 10, 12


def direct(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The unchunked reference: log_softmax over the real vocabulary, plain autograd."""
    ref = torch.log_softmax(logits[..., :VOCAB] / temperature, dim=-1)
    return ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(ref.exp() * ref).sum(-1)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, N_POS, PADDED, generator=g, dtype=dtype) * 3
    return logits, torch.randint(0, VOCAB, (2, N_POS), generator=g)


@pytest.mark.parametrize("chunk", [1, 3, 5, 14, 1024])
@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_chunked_equals_direct_values_and_gradients(chunk, entropy_weight):
    logits, targets = _data()
    mine = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(mine, targets, VOCAB, 0.7, with_entropy=True,
                                        chunk_tokens=chunk)
    ref_logp, ref_ent = direct(ref_in, targets, 0.7)
    weights = torch.linspace(-1, 2, logp.numel(), dtype=logp.dtype).view_as(logp)
    (weights * logp).sum().add(entropy_weight * ent.sum()).backward()
    (weights * ref_logp).sum().add(entropy_weight * ref_ent.sum()).backward()
    torch.testing.assert_close(logp, ref_logp, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-12, rtol=0)
    torch.testing.assert_close(mine.grad[..., :VOCAB], ref_in.grad[..., :VOCAB],
                               atol=1e-12, rtol=0)
    assert torch.all(mine.grad[..., VOCAB:] == 0)  # padding rows: no mass, no gradient


def test_bf16_logits_reduce_in_fp32_and_get_bf16_gradients():
    logits, targets = _data(torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    logp = vocab_parallel_logprobs(x, targets, VOCAB, 1.0, chunk_tokens=4)
    assert logp.dtype == torch.float32
    ref = direct(logits.float(), targets, 1.0)[0]
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    logp.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_saved_for_backward_is_the_input_plus_a_few_floats_per_position():
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    logits = torch.randn(4, 256, 512, requires_grad=True)  # [B, T, V/tp] fp32
    targets = torch.randint(0, 512, (4, 256))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, ent = vocab_parallel_logprobs(logits, targets, 512, 0.8, True, chunk_tokens=64)
    full = logits.numel() * logits.element_size()
    extra = sum(t.numel() * t.element_size() for t in saved if t is not logits
                and t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr())
    assert any(t is logits for t in saved)
    assert extra <= 4 * 256 * 4 * 8, extra  # targets (int64) + 3 floats per position
    # the direct form saves several full-vocabulary copies (here, for comparison)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref = torch.log_softmax(logits / 0.8, dim=-1)
        ref.gather(-1, targets.unsqueeze(-1)), -(ref.exp() * ref).sum(-1)
    assert sum(t.numel() * t.element_size() for t in saved) >= 2 * full


def grads_rank(rank, logits, targets, chunk):
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local = logits.chunk(tp, dim=-1)[r].clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(local, targets, VOCAB, 0.7, True, chunk_tokens=chunk)
    (logp.sum() - 0.5 * ent.sum()).backward()
    return logp.detach(), ent.detach(), local.grad


def test_chunked_at_tp2_equals_direct():
    logits, targets = _data()
    ref_in = logits.clone().requires_grad_(True)
    ref_logp, ref_ent = direct(ref_in, targets, 0.7)
    (ref_logp.sum() - 0.5 * ref_ent.sum()).backward()
    results = run_parallel(grads_rank, tp=2, args=(logits, targets, 3))
    grad = torch.cat([r[2] for r in results], dim=-1)
    for logp, ent, _ in results:
        torch.testing.assert_close(logp, ref_logp, atol=1e-12, rtol=0)
        torch.testing.assert_close(ent, ref_ent, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad[..., :VOCAB], ref_in.grad[..., :VOCAB], atol=1e-12, rtol=0)
    assert torch.all(grad[..., VOCAB:] == 0)
