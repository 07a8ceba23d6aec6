"""Hand-worked checks of the GAD maths in gad_megatron.algorithms.

Every expected number is worked out in the comment above its assert and written as a literal;
nothing here re-implements the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from gad_megatron.algorithms import (
    adaptive_temperature,
    aggregate,
    aggregate_normalizer,
    bradley_terry_loss,
    discriminator_metrics,
    grpo_advantages,
    kl_estimate,
    normalize_scores,
    policy_loss,
    score_regularizer,
    sft_loss,
)

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def t(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def close(a, b, atol=1e-6):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, atol=atol, rtol=0), f"{a} != {b}"


def one_token_ppo(ratio, adv, dual_clip=None, clip=0.2):
    """B=1, T=1 PPO with old log-prob 0 and log-prob log(ratio); returns loss, grad, metrics."""
    logp = t([[math.log(ratio)]], grad=True)
    loss, m = policy_loss(logp, t([[0.0]]), t([adv]), torch.ones(1, 1, dtype=torch.bool),
                          "ppo", clip, clip, "token-mean", dual_clip=dual_clip)
    loss.backward()
    return loss.item(), logp.grad.item(), m


# ---------------------------------------------------------------- Bradley-Terry ----------

def test_bt_loss_by_hand():
    # t=1, s=0: -log sigmoid(1) = log(1 + e^-1) = log(1.3678794) = 0.3132617
    close(bradley_terry_loss(t([1.0]), t([0.0])), 0.3132617)
    # t=0, s=0: log(1 + e^0) = log 2 = 0.6931472
    close(bradley_terry_loss(t([0.0]), t([0.0])), 0.6931472)
    # batch mean: z = [1, -1] -> log(1+e^-1) = 0.3132617, log(1+e) = 1.3132617; mean 0.8132617
    close(bradley_terry_loss(t([1.0, 0.0]), t([0.0, 1.0])), 0.8132617)


def test_bt_margin_and_temperature():
    # margin 1: z = (2 - 0 - 1)/1 = 1 -> 0.3132617
    close(bradley_terry_loss(t([2.0]), t([0.0]), margin=1.0), 0.3132617)
    # temperature 2: z = (2 - 0)/2 = 1 -> 0.3132617
    close(bradley_terry_loss(t([2.0]), t([0.0]), temperature=2.0), 0.3132617)
    # both: z = (3 - 0 - 1)/2 = 1 -> 0.3132617
    close(bradley_terry_loss(t([3.0]), t([0.0]), temperature=2.0, margin=1.0), 0.3132617)
    # margin can make a won pair lose: z = (1 - 0 - 2)/1 = -1 -> log(1 + e) = 1.3132617
    close(bradley_terry_loss(t([1.0]), t([0.0]), margin=2.0), 1.3132617)


def test_bt_huge_gap_is_finite_in_fp32():
    # Pair 0 right way (z = +1e4): -log sigmoid(1e4) = log(1 + e^-1e4) ~ 0.
    # Pair 1 wrong way (z = -1e4): log(1 + e^1e4) ~ 1e4. Mean = (0 + 1e4)/2 = 5000.
    ts = torch.tensor([1e4, 0.0], requires_grad=True)
    ss = torch.tensor([0.0, 1e4], requires_grad=True)
    loss = bradley_terry_loss(ts, ss)
    close(loss.item(), 5000.0)
    loss.backward()
    # d/dt [-log sigmoid(t - s)] = -sigmoid(-(t - s)), /B=2:
    # pair 0: -sigmoid(-1e4)/2 = 0;  pair 1: -sigmoid(1e4)/2 = -0.5; d/ds is the negative.
    close(ts.grad, [0.0, -0.5])
    close(ss.grad, [0.0, 0.5])
    assert torch.isfinite(ts.grad).all() and torch.isfinite(ss.grad).all()


def test_bt_validation():
    with pytest.raises(ValueError, match="same B"):
        bradley_terry_loss(t([1.0, 2.0]), t([0.0]))
    with pytest.raises(ValueError, match="temperature"):
        bradley_terry_loss(t([1.0]), t([0.0]), temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        bradley_terry_loss(t([1.0]), t([0.0]), temperature=-1.0)


def test_adaptive_temperature():
    # clamp(1 + 0.5*10, 0.5, 8) = clamp(6) = 6
    assert adaptive_temperature(10.0, base=1.0, scale=0.5, lo=0.5, hi=8.0) == 6.0
    # |gap| is used: clamp(1 + 0.5*|-10|) = 6
    assert adaptive_temperature(-10.0, base=1.0, scale=0.5, lo=0.5, hi=8.0) == 6.0
    # clamp(1 + 0.5*20 = 11) -> hi = 8
    assert adaptive_temperature(20.0, base=1.0, scale=0.5, lo=0.5, hi=8.0) == 8.0
    # clamp(0.1 + 0) -> lo = 0.5
    assert adaptive_temperature(0.0, base=0.1, scale=0.5, lo=0.5, hi=8.0) == 0.5
    # tensor of per-pair gaps [-2, 2]: mean |gap| = 2 -> 1 + 0.5*2 = 2
    assert adaptive_temperature(t([-2.0, 2.0]), base=1.0, scale=0.5, lo=0.5, hi=8.0) == 2.0
    with pytest.raises(ValueError):
        adaptive_temperature(1.0, base=1.0, scale=0.5, lo=0.0, hi=8.0)


def test_score_regularizer():
    # |[-3, 0.5, 2]| - 1 = [2, -0.5, 1] -> relu [2, 0, 1] -> squares [4, 0, 1], mean 5/3
    # weight 0.1 -> 0.1666667
    close(score_regularizer(t([-3.0, 0.5, 2.0]), threshold=1.0, weight=0.1), 0.1666667)
    # all inside the band -> 0
    close(score_regularizer(t([-0.5, 0.5]), threshold=1.0, weight=0.1), 0.0)


def test_normalize_scores():
    # concat [1, 3, 5, 7]: mean 4, population var (9 + 1 + 1 + 9)/4 = 5, std sqrt5 = 2.2360680
    # t -> [-3, -1]/2.2360680 = [-1.3416408, -0.4472136]; s -> [0.4472136, 1.3416408]
    tn, sn = normalize_scores(t([1.0, 3.0]), t([5.0, 7.0]), eps=0.0)
    close(tn, [-1.3416408, -0.4472136])
    close(sn, [0.4472136, 1.3416408])
    # constant batch: var 0, eps keeps it finite: (2 - 2)/sqrt(eps) = 0
    tn, sn = normalize_scores(t([2.0, 2.0]), t([2.0]))
    close(tn, [0.0, 0.0])
    close(sn, [0.0])


def test_discriminator_metrics_with_identical_mask():
    # t = [2, 1, 0, 3], s = [1, 1, 1, -1]
    # t > s: [T, F (tie), F, T] -> d_acc 2/4 = 0.5
    # t - s = [1, 0, -1, 4] -> mean 4/4 = 1.0
    # teacher mean 6/4 = 1.5, min 0, max 3; student mean 2/4 = 0.5, min -1, max 1
    # identical pairs 1 and 2: |t - s| = 0 and 1 -> count 2, mean 0.5
    ts, ss = t([2.0, 1.0, 0.0, 3.0]), t([1.0, 1.0, 1.0, -1.0])
    m = discriminator_metrics(ts, ss, identical=torch.tensor([False, True, True, False]))
    assert m == {
        "d_acc": 0.5, "score_gap": 1.0,
        "teacher_score_mean": 1.5, "teacher_score_min": 0.0, "teacher_score_max": 3.0,
        "student_score_mean": 0.5, "student_score_min": -1.0, "student_score_max": 1.0,
        "identical_count": 2, "identical_abs_gap": 0.5,
    }
    assert isinstance(m["identical_count"], int) and isinstance(m["d_acc"], float)
    # no identical pair -> count 0, gap 0.0 (not nan); same without a mask
    for ident in (torch.zeros(4, dtype=torch.bool), None):
        m = discriminator_metrics(ts, ss, identical=ident)
        assert m["identical_count"] == 0 and m["identical_abs_gap"] == 0.0


# ---------------------------------------------------------------- GRPO -------------------

def test_grpo_groups_of_different_sizes_noncontiguous_ids():
    # interleaved ids 7, 2, 9 (not contiguous, not sorted):
    # group 7: rewards 1, 2, 3 -> mean 2, unbiased std sqrt((1 + 0 + 1)/2) = 1 -> -1, 0, 1
    # group 2: rewards 4, 6    -> mean 5, unbiased std sqrt((1 + 1)/1) = sqrt2 -> -/+0.7071068
    # group 9: reward 5 alone  -> 0
    rewards = t([1.0, 4.0, 2.0, 5.0, 6.0, 3.0])
    groups = torch.tensor([7, 2, 7, 9, 2, 7])
    close(grpo_advantages(rewards, groups, eps=0.0),
          [-1.0, -0.7071068, 0.0, 0.0, 0.7071068, 1.0])
    # default eps = 1e-6 only perturbs at 1e-6 relative
    close(grpo_advantages(rewards, groups), [-1.0, -0.7071068, 0.0, 0.0, 0.7071068, 1.0],
          atol=2e-6)
    # without std: just minus the group mean
    close(grpo_advantages(rewards, groups, norm_by_std=False), [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0])


def test_grpo_group_of_one_and_equal_rewards_give_zero():
    # singleton: 3 - 3 = 0 (no nan from the n-1 = 0 std); equal pair [4, 4]: 0/(0 + eps) = 0
    adv = grpo_advantages(t([3.0, 4.0, 4.0]), torch.tensor([0, 5, 5]))
    close(adv, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(t([1.0]), t([0.0]))


# ---------------------------------------------------------------- KL ---------------------

def test_kl_kinds_by_hand():
    # d = logp - ref = [-1 - (-1.5), -2 - (-1)] = [0.5, -1]
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    close(kl_estimate(logp, ref, "k1"), [[0.5, -1.0]])
    close(kl_estimate(logp, ref, "abs"), [[0.5, 1.0]])
    # 0.5 * [0.25, 1] = [0.125, 0.5]
    close(kl_estimate(logp, ref, "k2"), [[0.125, 0.5]])
    # exp(-d) + d - 1: e^-0.5 + 0.5 - 1 = 0.6065307 - 0.5 = 0.1065307; e^1 - 1 - 1 = 0.7182818
    close(kl_estimate(logp, ref, "k3"), [[0.1065307, 0.7182818]])
    close(kl_estimate(logp, ref, "low_var_kl"), [[0.1065307, 0.7182818]])


def test_k3_is_clamped_and_finite():
    # d = -50: exp(50) would be 5e21 (inf-prone in fp16); bounded -> e^20 - 20 - 1 -> clamp 10
    # d = +50: bounded exponent -> e^-20 + 20 - 1 = 19 -> clamp 10
    logp = torch.tensor([[-50.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -50.0]])
    kl = kl_estimate(logp, ref, "k3")
    close(kl, [[10.0, 10.0]])
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_unknown_kind_lists_valid():
    with pytest.raises(ValueError, match="k1.*abs.*k2.*k3.*low_var_kl"):
        kl_estimate(t([[0.0]]), t([[0.0]]), "k4")


# ---------------------------------------------------------------- aggregate --------------

VALUES = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
MASK = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_aggregate_modes_by_hand():
    v, m = t(VALUES), torch.tensor(MASK)
    # token-mean: (1 + 2 + 4)/3 = 2.3333333
    close(aggregate(v, m, "token-mean"), 2.3333333)
    # seq-mean-token-mean: row means 1.5 and 4; row 3 has no valid token -> (1.5 + 4)/2 = 2.75
    close(aggregate(v, m, "seq-mean-token-mean"), 2.75)
    # seq-mean-token-sum: row sums 3 and 4 -> (3 + 4)/2 = 3.5
    close(aggregate(v, m, "seq-mean-token-sum"), 3.5)
    # denominators the caller would sum into a global normaliser: 3 tokens, 2 sequences
    assert aggregate_normalizer(m, "token-mean").item() == 3
    assert aggregate_normalizer(m, "seq-mean-token-mean").item() == 2
    assert aggregate_normalizer(m, "seq-mean-token-sum").item() == 2


def test_aggregate_global_normalizer_by_hand():
    v, m = t(VALUES), torch.tensor(MASK)
    # token-mean: 7/10 = 0.7;  seq-mean-token-mean: (1.5 + 4)/10 = 0.55;  token-sum: 7/10 = 0.7
    close(aggregate(v, m, "token-mean", global_normalizer=10), 0.7)
    close(aggregate(v, m, "seq-mean-token-mean", global_normalizer=10), 0.55)
    close(aggregate(v, m, "seq-mean-token-sum", global_normalizer=torch.tensor(10)), 0.7)


@pytest.mark.parametrize("mode", AGGS)
def test_aggregate_fully_masked_is_zero_without_nan(mode):
    # masked slots hold nan / inf (e.g. padding log-probs): never read
    v = torch.tensor([[float("nan"), float("inf")], [1.0, 2.0]], requires_grad=True)
    m = torch.zeros(2, 2, dtype=torch.bool)
    for norm in (None, 0, 8):
        out = aggregate(v, m, mode, global_normalizer=norm)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, v)
        assert torch.equal(g, torch.zeros(2, 2))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-mean.*seq-mean-token-sum"):
        aggregate(t(VALUES), torch.tensor(MASK), "seq-sum")
    with pytest.raises(ValueError, match="mask shape"):
        aggregate(t(VALUES), torch.ones(3, 2), "token-mean")


def test_sft_loss_by_hand():
    # NLL = -log_probs = [[1, 2], [3, 4]] with mask [[1, 1], [1, 0]]
    lp, m = t([[-1.0, -2.0], [-3.0, -4.0]]), torch.tensor([[1, 1], [1, 0]])
    close(sft_loss(lp, m, "token-mean"), 2.0)             # (1 + 2 + 3)/3
    close(sft_loss(lp, m, "seq-mean-token-mean"), 2.25)   # (1.5 + 3)/2
    close(sft_loss(lp, m, "seq-mean-token-sum"), 3.0)     # (3 + 3)/2
    close(sft_loss(lp, m, "token-mean", global_normalizer=12), 0.5)  # 6/12


# ---------------------------------------------------------------- PPO --------------------

def test_ppo_clipped_high():
    # A = 1, r = 1.5 > 1.2: max(-1*1.5, -1*clip(1.5) = -1.2) = -1.2, constant -> grad 0
    # approx_kl (k3 of KL(old||new)) = r - 1 - log r = 0.5 - 0.4054651 = 0.0945349
    loss, grad, m = one_token_ppo(1.5, 1.0)
    close(loss, -1.2)
    close(grad, 0.0)
    close([m["clip_frac"], m["ratio_mean"], m["approx_kl"]], [1.0, 1.5, 0.0945349])
    assert "dual_clip_frac" not in m


def test_ppo_clipped_low():
    # A = -1, r = 0.5 < 0.8: max(1*0.5, 1*0.8) = 0.8, constant -> grad 0
    loss, grad, m = one_token_ppo(0.5, -1.0)
    close(loss, 0.8)
    close(grad, 0.0)
    close(m["clip_frac"], 1.0)


def test_ppo_unclipped():
    # A = 2, r = 1.1 in [0.8, 1.2]: loss -2*1.1 = -2.2; d/dlogp (-A e^logp) = -A r = -2.2
    loss, grad, m = one_token_ppo(1.1, 2.0)
    close(loss, -2.2)
    close(grad, -2.2)
    close(m["clip_frac"], 0.0)
    # A = 1, r = 0.5 < 0.8: max(-0.5, -0.8) = -0.5 -> the unclipped branch, grad -A r = -0.5
    loss, grad, m = one_token_ppo(0.5, 1.0)
    close([loss, grad, m["clip_frac"]], [-0.5, -0.5, 0.0])
    # A = -1, r = 2 > 1.2: max(2, 1.2) = 2 -> unclipped (PPO never caps this side), grad 2
    loss, grad, m = one_token_ppo(2.0, -1.0)
    close([loss, grad, m["clip_frac"]], [2.0, 2.0, 0.0])


def test_ppo_dual_clip():
    # row 0: A = -1, r = 5: max(5, 1.2) = 5 > cap -A*3 = 3 -> 3, grad 0
    # row 1: A = -1, r = 2: max(2, 1.2) = 2 < 3 -> 2, grad d(2 e^logp)/dlogp / 2 rows = 2/2 = 1
    # token-mean over 2 tokens: (3 + 2)/2 = 2.5; dual_clip_frac 1/2; clip_frac 0/2
    logp = t([[math.log(5.0)], [math.log(2.0)]], grad=True)
    loss, m = policy_loss(logp, t([[0.0], [0.0]]), t([-1.0, -1.0]), torch.ones(2, 1),
                          "ppo", 0.2, 0.2, "token-mean", dual_clip=3.0)
    loss.backward()
    close(loss, 2.5)
    close(logp.grad, [[0.0], [1.0]])
    close([m["dual_clip_frac"], m["clip_frac"]], [0.5, 0.0])
    # A > 0 is never dual-clipped: A = 1, r = 5 -> max(-5, -1.2) = -1.2 as without dual clip
    loss, grad, m = one_token_ppo(5.0, 1.0, dual_clip=3.0)
    close([loss, grad, m["dual_clip_frac"], m["clip_frac"]], [-1.2, 0.0, 0.0, 1.0])


def test_policy_loss_validation():
    lp, m = t([[0.0]]), torch.ones(1, 1)
    with pytest.raises(ValueError, match="ppo.*gspo"):
        policy_loss(lp, lp, t([1.0]), m, "trpo", 0.2, 0.2, "token-mean")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, lp, t([1.0]), m, "ppo", 0.2, 0.2, "token-mean", dual_clip=1.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, lp, t([1.0, 2.0]), m, "ppo", 0.2, 0.2, "token-mean")
    with pytest.raises(ValueError, match="valid modes"):
        policy_loss(lp, lp, t([1.0]), m, "ppo", 0.2, 0.2, "mean")


# ---------------------------------------------------------------- GSPO -------------------

def gspo_row(delta, adv, agg="token-mean", clip_low=0.5, clip_high=0.5):
    """One row, two valid tokens with logp - old = delta, then a masked slot holding garbage."""
    logp = t([[delta[0], delta[1], 100.0]], grad=True)  # 100 would give r = e^100 if read
    old = t([[0.0, 0.0, -1e9]])
    loss, m = policy_loss(logp, old, t([adv]), torch.tensor([[1, 1, 0]]), "gspo",
                          clip_low, clip_high, agg)
    loss.backward()
    return loss, logp.grad, m


def test_gspo_value_is_sequence_ratio_and_gradient():
    # log s = mean(0.2, 0.4) = 0.3 -> s = e^0.3 = 1.3498588, inside [0.5, 1.5]; A = 2
    # each token: -A s = -2.6997176; token-mean over 2 tokens -> -2.6997176
    # d loss / d logp_t = (1/|y|) * (-A) * s * d(logp_t - sg logp_t)/d logp_t
    #                   = (1/2) * (-2) * 1.3498588 * 1 = -1.3498588, masked slot 0
    loss, grad, m = gspo_row([0.2, 0.4], 2.0)
    close(loss, -2.6997176)
    close(grad, [[-1.3498588, -1.3498588, 0.0]])
    # this equals the gradient of the sequence objective -A exp(mean(logp - old)):
    # d/dlogp_t = -A s / 2 = -1.3498588. ratio_mean is s on every valid token.
    close([m["ratio_mean"], m["clip_frac"]], [1.3498588, 0.0])
    # seq-mean-token-sum: loss = 2 tokens * -2.6997176 = -5.3994353; grad -A s = -2.6997176
    loss, grad, _ = gspo_row([0.2, 0.4], 2.0, agg="seq-mean-token-sum")
    close(loss, -5.3994353)
    close(grad, [[-2.6997176, -2.6997176, 0.0]])


def test_gspo_clipping():
    # paper clips 3e-4 / 4e-4 -> range [0.9997, 1.0004]
    # A = 1, s = e^0.3 = 1.3498588 > 1.0004: max(-1.3498588, -1.0004) = -1.0004, grad 0
    loss, grad, m = gspo_row([0.2, 0.4], 1.0, clip_low=3e-4, clip_high=4e-4)
    close(loss, -1.0004)
    close(grad, [[0.0, 0.0, 0.0]])
    close(m["clip_frac"], 1.0)
    # A = -1, s = e^-0.3 = 0.7408182 < 0.9997: max(0.7408182, 0.9997) = 0.9997, grad 0
    loss, grad, m = gspo_row([-0.2, -0.4], -1.0, clip_low=3e-4, clip_high=4e-4)
    close(loss, 0.9997)
    close(grad, [[0.0, 0.0, 0.0]])
    close(m["clip_frac"], 1.0)
    # A = -1, s = 1.3498588 > 1.0004: max(1.3498588, 1.0004) -> unclipped branch;
    # grad (1/2) * (-A) * s = 1.3498588/2 = 0.6749294 per valid token
    loss, grad, m = gspo_row([0.2, 0.4], -1.0, clip_low=3e-4, clip_high=4e-4)
    close(loss, 1.3498588)
    close(grad, [[0.6749294, 0.6749294, 0.0]])
    close(m["clip_frac"], 0.0)


def test_gspo_huge_log_ratio_is_bounded():
    # mean log-ratio 1000 would overflow exp; bounded to 20 -> s = e^20, A = -1 -> loss e^20
    logp = t([[1000.0]], grad=True)
    loss, _ = policy_loss(logp, t([[0.0]]), t([-1.0]), torch.ones(1, 1), "gspo", 3e-4, 4e-4,
                          "token-mean")
    loss.backward()
    close(loss / math.exp(20.0), 1.0)
    assert torch.isfinite(logp.grad).all()


# ------------------------------------------------------ masking edge cases ---------------

@pytest.mark.parametrize("kind", ["ppo", "gspo"])
@pytest.mark.parametrize("agg,expected", [
    # row 0: logp = old -> r = 1, A = 1 -> -1 per token over 2 tokens; row 1 fully masked.
    ("token-mean", -1.0),           # (-1 - 1)/2 tokens
    ("seq-mean-token-mean", -1.0),  # mean(-1, -1) over the 1 valid sequence
    ("seq-mean-token-sum", -2.0),   # (-1 - 1) over the 1 valid sequence
])
def test_fully_masked_row_contributes_nothing(kind, agg, expected):
    logp = torch.tensor([[-1.0, -2.0], [float("-inf"), 5.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0], [3.0, float("nan")]])
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, m = policy_loss(logp, old, torch.tensor([1.0, 50.0]), mask, kind, 0.2, 0.2, agg,
                          dual_clip=3.0)
    loss.backward()
    close(loss.item(), expected)
    assert torch.isfinite(logp.grad).all()
    close(logp.grad[1], [0.0, 0.0])
    # metrics only see row 0: r = 1 everywhere, nothing clipped, KL 0
    assert m == {"dual_clip_frac": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0}


@pytest.mark.parametrize("kind", ["ppo", "gspo"])
@pytest.mark.parametrize("agg", AGGS)
def test_all_rows_masked_gives_zero(kind, agg):
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, m = policy_loss(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3), kind,
                          0.2, 0.2, agg)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert m == {"clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0}


@pytest.mark.parametrize("kind", ["ppo", "gspo"])
def test_single_token_response(kind):
    # one valid token, logp - old = 0.1 -> r = s = e^0.1 = 1.1051709 (inside [0.8, 1.2])
    # A = 1: loss -1.1051709 in both kinds (the sequence ratio of one token is its ratio);
    # grad -A r = -1.1051709 on that token, 0 on the 3 padding slots
    logp = t([[0.1, -7.0, -7.0, -7.0]], grad=True)
    loss, _ = policy_loss(logp, t([[0.0, 0.0, 0.0, 0.0]]), t([1.0]),
                          torch.tensor([[1, 0, 0, 0]]), kind, 0.2, 0.2, "seq-mean-token-mean")
    loss.backward()
    close(loss, -1.1051709)
    close(logp.grad, [[-1.1051709, 0.0, 0.0, 0.0]])
