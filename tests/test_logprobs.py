"""Vocab-parallel log-probs and entropy at TP=2 vs log_softmax of transformers' logits."""

from __future__ import annotations

import torch

from tests.dist_utils import run_parallel
from tests.tiny_models import hf_logits, make_hf_model


def logprobs_rank(rank, model_dir, tokens):
    from megatron.core import parallel_state as ps

    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.models.builder import build_gpt
    from gad_megatron.models.forward import MicroBatch, run_schedule
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.models.logprobs import vocab_parallel_logprobs

    arch = read_hf_config(model_dir)
    model = build_gpt(arch, ps.get_tensor_model_parallel_world_size(), 1)
    load_hf_weights(model, arch, model_dir)
    mb = MicroBatch(tokens[:, :-1], torch.ones_like(tokens[:, :-1], dtype=torch.bool), {})
    with torch.no_grad():
        (out,) = run_schedule(model, [mb], lambda logits, mb: vocab_parallel_logprobs(
            logits, tokens[:, 1:], vocab_size=arch.vocab_size, with_entropy=True))
    return out


def test_logprobs_and_entropy_at_tp2_match_hf(tmp_path):
    model_dir = make_hf_model("qwen2", tmp_path / "m")
    tokens = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(3))
    ref = torch.log_softmax(hf_logits(model_dir, tokens[:, :-1]).double(), dim=-1)
    ref_logp = ref.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(ref.exp() * ref).sum(-1)
    for logp, entropy in run_parallel(logprobs_rank, tp=2, args=(model_dir, tokens)):
        assert (logp.double() - ref_logp).abs().max() <= 1e-5
        assert (entropy.double() - ref_entropy).abs().max() <= 1e-5


def grads_rank(rank, logits, targets, vocab):
    from megatron.core import parallel_state as ps

    from gad_megatron.models.logprobs import vocab_parallel_logprobs

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local = logits.chunk(tp, dim=-1)[r].clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(local, targets, vocab_size=vocab, temperature=0.7,
                                        with_entropy=True)
    (logp.sum() + 0.3 * ent.sum()).backward()
    return logp.detach(), ent.detach(), local.grad


def test_logprob_gradients_at_tp2_equal_full_vocab(tmp_path):
    # Padded vocabulary: 12 rows, 10 real; the two padding rows must get no mass and no grad.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 10, (2, 5), generator=g)
    full = logits[..., :10].clone().requires_grad_(True)
    ref = torch.log_softmax(full / 0.7, dim=-1)
    ref_logp = ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(ref.exp() * ref).sum(-1)
    (ref_logp.sum() + 0.3 * ref_ent.sum()).backward()
    results = run_parallel(grads_rank, tp=2, args=(logits, targets, 10))
    grad = torch.cat([r[2] for r in results], dim=-1)
    for logp, ent, _ in results:
        torch.testing.assert_close(logp, ref_logp, atol=1e-10, rtol=0)
        torch.testing.assert_close(ent, ref_ent, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad[..., :10], full.grad, atol=1e-10, rtol=0)
    assert torch.all(grad[..., 10:] == 0)
