"""Each discriminator remedy, turned on from the config, changes the BT loss by the
hand-worked amount (gad_megatron.algorithms.discriminator_loss, through the worker's
`bt_loss` wiring), and off it is exactly the paper's loss.

One pair set throughout: teacher scores t = [2, 0], sample scores s = [0, 0], so the gaps
are [2, 0] and the paper's loss is (softplus(-2) + ln 2) / 2.
"""

from __future__ import annotations

import math

import pytest
import torch

from gad_megatron.algorithms import bradley_terry_loss, discriminator_loss
from gad_megatron.config.schema import DiscriminatorConfig

T, S = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
LN2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


PLAIN = (softplus(-2.0) + LN2) / 2  # 0.410038
# normalize: [2, 0, 0, 0] has mean 0.5 and population variance 0.75, so the gaps become
# [2 / sqrt(0.75), 0] = [2.309401, 0].
NORM_GAP = 2.0 / math.sqrt(0.75)
# adaptive (scale 0.5, clamp [1, 8], base 1): mean |gap| = 1 -> T = 1.5.
# both: mean |normalised gap| = 1.154701 -> T = 1.577350.
T_BOTH = 1.0 + 0.5 * NORM_GAP / 2
CASES = {
    "paper": ({}, PLAIN),
    "temperature 2": ({"bt_temperature": 2.0}, (softplus(-1.0) + LN2) / 2),
    "margin 1": ({"bt_margin": 1.0}, (softplus(-1.0) + softplus(1.0)) / 2),
    "normalize": ({"normalize_scores": True}, (softplus(-NORM_GAP) + LN2) / 2),
    "adaptive": ({"adaptive_temperature": True}, (softplus(-2.0 / 1.5) + LN2) / 2),
    "normalize+adaptive": ({"normalize_scores": True, "adaptive_temperature": True},
                           (softplus(-NORM_GAP / T_BOTH) + LN2) / 2),
    # raw scores [2, 0, 0, 0] beyond threshold 1: excess [1, 0, 0, 0] -> 0.5 * 1/4 = 0.125
    "score regulariser": ({"score_reg_weight": 0.5, "score_reg_threshold": 1.0}, PLAIN + 0.125),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_config_setting_gives_the_hand_worked_loss(name):
    from gad_megatron.workers.discriminator import bt_loss

    fields, want = CASES[name]
    got = bt_loss(DiscriminatorConfig(**fields), T, S).item()
    assert got == pytest.approx(want, abs=2e-6), (name, got, want)


def test_the_hand_worked_numbers_themselves():
    # Guard the constants above with their decimal values (worked on paper).
    assert PLAIN == pytest.approx(0.410038, abs=1e-6)
    assert CASES["normalize"][1] == pytest.approx(0.393926, abs=1e-5)
    assert CASES["adaptive"][1] == pytest.approx(0.463555, abs=1e-6)
    assert CASES["normalize+adaptive"][1] == pytest.approx(0.450599, abs=1e-5)


def test_defaults_are_exactly_the_paper_loss():
    t, s = torch.randn(16), torch.randn(16)
    assert discriminator_loss(t, s).item() == bradley_terry_loss(t, s).item()


def test_normalize_removes_the_scale_of_the_scores():
    # Scaling every score by 10 saturates the plain loss but not the normalised one.
    assert discriminator_loss(10 * T, 10 * S).item() < 1e-3 + LN2 / 2
    assert discriminator_loss(10 * T, 10 * S, normalize=True).item() == pytest.approx(
        discriminator_loss(T, S, normalize=True).item(), abs=1e-5)


def test_adaptive_temperature_is_not_differentiated_through():
    t = T.clone().requires_grad_(True)
    discriminator_loss(t, S, adaptive=(0.5, 1.0, 8.0)).backward()
    # d/dt0 of softplus(-t0 / 1.5) / 2 with T held fixed at 1.5: -sigmoid(-4/3) / 3
    assert t.grad[0].item() == pytest.approx(-1 / (1 + math.exp(4 / 3)) / 3, abs=1e-6)


def test_identical_pair_stays_at_zero_gap_under_normalisation():
    t = torch.tensor([1.0, 3.0], requires_grad=True)
    s = torch.stack([t[0], torch.tensor(-1.0)])  # pair 0: the sample *is* the teacher answer
    loss = discriminator_loss(t, s, normalize=True, adaptive=(0.5, 1.0, 8.0))
    loss.backward()
    assert torch.isfinite(t.grad).all()


def test_config_refuses_bad_remedy_settings():
    with pytest.raises(ValueError, match="adaptive_temp_min"):
        DiscriminatorConfig(adaptive_temp_min=4.0, adaptive_temp_max=2.0)
    with pytest.raises(ValueError, match="normalize_eps"):
        DiscriminatorConfig(normalize_eps=0.0)
