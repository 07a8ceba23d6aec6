"""The global normaliser makes micro-batching and data parallelism invisible to the loss.

One global batch of 16 sequences (variable lengths, one fully masked row) is run as
  (a) 1 rank  x 8 micro-batches of 2 sequences,
  (b) 2 DP ranks (gloo) x 4 micro-batches of 2 sequences,
summing micro-batch losses, back-propagating each micro-batch (gradients accumulate) and
all-reducing (SUM) gradients over DP ranks. Both must equal the loss and gradients of the
whole batch in one call with its own denominator, for every aggregation mode and loss.
"""

from __future__ import annotations

import pytest
import torch

from gad_megatron.algorithms import aggregate_normalizer, policy_loss, sft_loss
from gad_megatron.parallel.launch import spawn_ranks

B, T, H, V = 16, 7, 4, 5
MICRO_BATCH = 2
# Unequal lengths and a fully masked row (index 4), so micro-batches differ in both their
# token counts and their valid-sequence counts.
LENGTHS = [3, 7, 1, 5, 0, 2, 6, 4, 7, 2, 5, 1, 3, 6, 4, 2]
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
LOSSES = ("ppo", "gspo", "sft")


def _batch():
    """Deterministic global batch, identical in every process."""
    g = torch.Generator().manual_seed(1234)
    feats = torch.randn(B, T, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    weight = torch.randn(H, V, generator=g)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)      # [B, T]
    adv = torch.randn(B, generator=g)
    # old log-probs = current ones plus noise, so some tokens fall outside the clip range
    with torch.no_grad():
        old = _log_probs(weight, feats, targets) + 0.3 * torch.randn(B, T, generator=g)
    return feats, targets, weight, mask, adv, old


def _log_probs(weight, feats, targets):
    """Token log-probs of a one-layer 'policy': log_softmax(feats @ W)[target]. [b, T]"""
    logits = feats @ weight                                                       # [b, T, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _loss(kind, logp, old, adv, mask, mode, norm):
    if kind == "sft":
        return sft_loss(logp, mask, mode, global_normalizer=norm)
    return policy_loss(logp, old, adv, mask, kind, 0.2, 0.28, mode, dual_clip=3.0,
                       global_normalizer=norm)[0]


def _train_step(rank, world_size, kind, mode, use_global):
    """Micro-batched step on this rank's shard; returns (loss, grad) summed over DP ranks."""
    import torch.distributed as dist

    feats, targets, weight0, mask, adv, old = _batch()
    rows = torch.arange(B).chunk(world_size)[rank]
    weight = weight0.clone().requires_grad_(True)
    norm = None
    if use_global:
        # Count this rank's denominator and sum over DP ranks: the global batch's N.
        norm = aggregate_normalizer(mask[rows], mode)
        dist.all_reduce(norm)
    total = torch.zeros(())
    for mb in rows.split(MICRO_BATCH):
        logp = _log_probs(weight, feats[mb], targets[mb])
        loss = _loss(kind, logp, old[mb], adv[mb], mask[mb], mode, norm)
        loss.backward()
        total += loss.detach()
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    dist.all_reduce(total)
    return total, grad


def _rank_fn(rank, world_size):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    # The launcher destroys the process group after this returns.
    return {(kind, mode, use_global): _train_step(rank, world_size, kind, mode, use_global)
            for kind in LOSSES for mode in MODES for use_global in (True, False)}


@pytest.fixture(scope="module")
def runs():
    # (a) one spawned gloo rank, (b) two; each returns its post-all-reduce loss and grads.
    (single,) = spawn_ranks(_rank_fn, 1, timeout_s=120.0)
    dp = spawn_ranks(_rank_fn, 2, timeout_s=120.0)
    return single, dp


def _full_batch(kind, mode):
    feats, targets, weight0, mask, adv, old = _batch()
    weight = weight0.clone().requires_grad_(True)
    loss = _loss(kind, _log_probs(weight, feats, targets), old, adv, mask, mode, None)
    loss.backward()
    return loss.detach(), weight.grad


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_and_dp_ranks_equal_full_batch(runs, kind, mode):
    single, dp = runs
    ref_loss, ref_grad = _full_batch(kind, mode)
    assert ref_grad.abs().max() > 1e-3  # the comparison is not vacuous
    candidates = [single[(kind, mode, True)]] + [r[(kind, mode, True)] for r in dp]
    for loss, grad in candidates:  # 1x8, then each of the 2 DP ranks after all-reduce
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_without_global_normalizer_mean_of_means_differs(runs, mode):
    # Documenting assertion: each micro-batch dividing by its own count, averaged over the
    # 4 micro-batches x 2 ranks, weights short micro-batches (and the one holding the
    # fully masked row) too much, so it is NOT the global-batch loss.
    _, dp = runs
    ref_loss, ref_grad = _full_batch("ppo", mode)
    naive_loss, naive_grad = dp[0][("ppo", mode, False)]
    n_micro = B // MICRO_BATCH
    assert (naive_loss / n_micro - ref_loss).abs() > 1e-3
    assert (naive_grad / n_micro - ref_grad).abs().max() > 1e-3
