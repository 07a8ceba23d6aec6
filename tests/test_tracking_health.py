"""The reward-hacking watch on constructed metric streams: each windowed rule fires at the
step its hand-computed window crosses the threshold, once, and re-arms when it clears; the
streams that look alike but are healthy never fire it."""

from __future__ import annotations

import pytest

from gad_megatron.tracking.config import TrackingConfig
from gad_megatron.tracking.health import HealthWatch

CFG = TrackingConfig(health_window=4, length_drift_tol=0.25, reward_divergence_min=0.1,
                     d_collapse_tol=0.05, d_collapse_from=0.7, d_loss_flat_tol=0.02)


def fired(stream: list[dict], rule: str, cfg: TrackingConfig = CFG) -> list[int]:
    watch = HealthWatch(cfg)
    return [step for step, m in enumerate(stream)
            if rule in [w.name for w in watch.update(step, m)]]


def lengths(student: list[float], teacher: float = 20.0) -> list[dict]:
    return [{"g/response_len_mean": s, "g/teacher_len_mean": teacher} for s in student]


def test_length_drift_fires_when_the_window_ratio_leaves_the_band():
    # Window ratios from step 3: 80/80, 86/80, 92/80, 98/80, 104/80 = 1.30 (> 1.25: fire),
    # then 98/80 = 1.225 (clear), ..., and a second drift, downwards this time.
    student = [20, 20, 20, 20, 26, 26, 26, 26, 20, 20, 20, 20, 14, 14, 14, 14]
    assert fired(lengths(student), "length_drift") == [7, 15]
    # The single-step band (0.5..2.0) never saw a problem in this stream.
    assert fired(lengths(student), "length_ratio") == []


def test_length_drift_message_and_silence_without_samples():
    watch = HealthWatch(CFG)
    out = [watch.update(i, m) for i, m in enumerate(lengths([30] * 4))]
    assert out[:3] == [[], [], []]  # the window is not full yet
    assert "1.50 over the last 4 steps" in out[3][0]
    # seqkd steps log the teacher's length only: the rule says nothing.
    assert fired([{"g/teacher_len_mean": 20.0}] * 8, "length_drift") == []


def rewards(live: list[float], frozen: list[float]) -> list[dict]:
    return [{"g/reward_mean": a, "g/frozen_d_reward": b} for a, b in zip(live, frozen)]


def test_frozen_d_divergence_fires_when_live_rises_and_frozen_falls():
    live = [0.0, 0.0, 0.5, 0.5, 0.5, 0.5]
    frozen = [0.0, 0.0, -0.5, -0.5, -0.5, -0.5]
    # step 3: live +0.5, frozen -0.5 (fire); step 5: halves equal again (clears).
    assert fired(rewards(live, frozen), "frozen_d_divergence") == [3]
    watch = HealthWatch(CFG)
    msg = [w for i, m in enumerate(rewards(live, frozen)) for w in watch.update(i, m)]
    assert "live-D reward +0.500 while the frozen-D reward -0.500" in msg[0]


@pytest.mark.parametrize("live, frozen", [
    ([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]),      # both rise: G is learning
    ([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, -0.05, -0.05]),  # frozen falls by less than 0.1
    ([0.0, 0.0, -0.5, -0.5], [0.0, 0.0, -0.5, -0.5]),  # both fall
])
def test_frozen_d_divergence_quiet_on_healthy_streams(live, frozen):
    assert fired(rewards(live, frozen), "frozen_d_divergence") == []


def test_frozen_d_divergence_needs_the_monitor():
    # Without train.frozen_d_monitor there is no frozen-D reward: never fires.
    assert fired([{"g/reward_mean": float(i)} for i in range(10)], "frozen_d_divergence") == []


def d_stream(acc: list[float], loss: list[float]) -> list[dict]:
    return [{"d/d_acc": a, "d/d_loss": b} for a, b in zip(acc, loss)]


def test_d_collapse_fires_when_acc_falls_to_chance_and_loss_is_flat():
    acc = [0.9] * 4 + [0.5] * 4 + [0.8] * 4 + [0.52] * 4
    loss = [0.4, 0.3, 0.2, 0.1] + [0.693] * 4 + [0.3] * 4 + [0.69, 0.695, 0.69, 0.7]
    # step 7: window mean 0.5, best window 0.9, loss spread 0 -> fire; step 8 clears;
    # step 15: mean 0.52, spread 0.01 -> fire again.
    assert fired(d_stream(acc, loss), "d_collapse") == [7, 15]


def test_d_collapse_quiet_when_d_never_learned_or_loss_moves():
    never = d_stream([0.5] * 12, [0.693] * 12)  # d_acc_low's case, not a collapse
    assert fired(never, "d_collapse") == []
    moving = d_stream([0.9] * 4 + [0.5] * 8, [0.3] * 4 + [0.6, 0.7, 0.8, 0.9] * 2)
    assert fired(moving, "d_collapse") == []  # spread 0.3 > 0.02: D is still moving


def test_windowed_settings_are_validated():
    with pytest.raises(ValueError, match="health_window"):
        TrackingConfig(health_window=1)
    with pytest.raises(ValueError, match="reward_divergence_min"):
        TrackingConfig(reward_divergence_min=-1.0)
