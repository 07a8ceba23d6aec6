"""Training-health rules over the per-step metrics: warnings for a human, never a stop.

GAD fails quietly: a discriminator that never learns (d_acc ~ 0.5) hands the student noise as
reward, one that wins outright (d_acc ~ 1, huge score gap) hands it no gradient, and a student
that games D often does it through answer length. Each rule here watches one of these; it
reports once when its condition starts and is re-armed when the condition clears.

Three rules look at a window of recent steps (`health_window`) instead of one step, because
reward hacking is a trend: the length drifting away from the teacher's, the live D's reward
rising while a frozen D's falls, D's accuracy sinking to chance while its loss stops moving.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from gad_megatron.tracking.config import TrackingConfig


class HealthWarning(str):
    """A warning line that also carries its rule name (MLflow tag `health.<name>`)."""

    name: str

    def __new__(cls, name: str, text: str) -> "HealthWarning":
        obj = super().__new__(cls, text)
        obj.name = name
        return obj


@dataclass
class _Rule:
    name: str
    check: Callable[[dict], str | None | bool]
    """None: the metric is absent this step (state unchanged); False: fine; str: the problem."""
    patience: int = 1
    streak: int = 0
    fired: bool = False


WINDOWED = ("g/response_len_mean", "g/teacher_len_mean", "g/reward_mean", "g/frozen_d_reward",
            "d/d_acc", "d/d_loss")
"""Metrics the windowed rules keep a history of."""


class HealthWatch:
    """`update(step, metrics)` -> the warnings that start at this step."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.clip_active = False  # clipping has acted at least once (see _clip)
        self.rules = [
            _Rule("d_acc_low", self._d_acc_low, cfg.d_acc_patience),
            _Rule("d_acc_high", self._d_acc_high, cfg.d_acc_patience),
            _Rule("score_gap", self._score_gap),
            _Rule("clip_frac", self._clip),
            _Rule("length_ratio", self._length_ratio),
            _Rule("length_drift", self._length_drift),
            _Rule("frozen_d_divergence", self._frozen_d_divergence),
            _Rule("d_collapse", self._d_collapse),
        ]
        self.history: dict[str, deque] = {k: deque(maxlen=cfg.health_window) for k in WINDOWED}
        self.best_d_acc = float("-inf")  # best window mean of d_acc so far (d_collapse)

    def update(self, step: int, metrics: dict) -> list[HealthWarning]:
        for key, values in self.history.items():
            value = _get(metrics, key)
            if value is not None:
                values.append(value)
        out = []
        for rule in self.rules:
            problem = rule.check(metrics)
            if problem is None:
                continue
            if problem is False:
                rule.streak, rule.fired = 0, False
                continue
            rule.streak += 1
            if rule.streak >= rule.patience and not rule.fired:
                rule.fired = True
                out.append(HealthWarning(rule.name, f"[health] step {step}: {problem}"))
        return out

    def _d_acc_low(self, m: dict):
        acc = _get(m, "d/d_acc")
        if acc is None:
            return None
        return acc < self.cfg.d_acc_low and (
            f"d_acc {acc:.3f} < {self.cfg.d_acc_low} for {self.cfg.d_acc_patience} steps: "
            "the discriminator is not learning, so the student's reward is noise")

    def _d_acc_high(self, m: dict):
        acc = _get(m, "d/d_acc")
        if acc is None:
            return None
        return acc > self.cfg.d_acc_high and (
            f"d_acc {acc:.3f} > {self.cfg.d_acc_high} for {self.cfg.d_acc_patience} steps: "
            "the discriminator is over-confident, so the student gets little signal")

    def _score_gap(self, m: dict):
        gap = _get(m, "d/score_gap")
        if gap is None:
            return None
        return abs(gap) > self.cfg.score_gap_max and (
            f"score gap {gap:.2f} beyond {self.cfg.score_gap_max}: the discriminator's "
            "scores saturate (consider discriminator.score_reg_weight)")

    def _clip(self, m: dict):
        frac = _get(m, "g/clip_frac")
        if frac is None:
            return None
        # On-policy single-pass training keeps the ratio at 1, so a zero clip fraction is
        # expected there; the lower bound only means something once clipping has acted.
        self.clip_active = self.clip_active or frac > 0
        lo, hi = self.cfg.clip_frac_low, self.cfg.clip_frac_high
        if frac > hi:
            return f"clip fraction {frac:.3f} > {hi}: most policy updates are cut off"
        if self.clip_active and frac < lo:
            return f"clip fraction {frac:.3f} < {lo}: the clip range barely acts"
        return False

    def _length_ratio(self, m: dict):
        student, teacher = _get(m, "g/response_len_mean"), _get(m, "g/teacher_len_mean")
        if student is None or not teacher:
            return None
        ratio = student / teacher
        lo, hi = self.cfg.length_ratio_min, self.cfg.length_ratio_max
        return not lo <= ratio <= hi and (
            f"student/teacher length ratio {ratio:.2f} outside [{lo}, {hi}]: "
            "possible reward hacking through answer length")


    def _window(self, *keys: str) -> list[list[float]] | None:
        """The last `health_window` values of each key, or None until every one is full."""
        if any(len(self.history[k]) < self.cfg.health_window for k in keys):
            return None
        return [list(self.history[k]) for k in keys]

    def _length_drift(self, m: dict):
        if "g/response_len_mean" not in m:
            return None  # only judged on steps that sampled
        got = self._window("g/response_len_mean", "g/teacher_len_mean")
        if got is None or not sum(got[1]):
            return None
        ratio = sum(got[0]) / sum(got[1])
        tol, w = self.cfg.length_drift_tol, self.cfg.health_window
        return abs(ratio - 1.0) > tol and (
            f"student/teacher length ratio {ratio:.2f} over the last {w} steps, beyond "
            f"1 +- {tol}: the answers drift from the teacher's length (reward hacking?)")

    def _frozen_d_divergence(self, m: dict):
        if "g/frozen_d_reward" not in m:
            return None
        got = self._window("g/reward_mean", "g/frozen_d_reward")
        if got is None:
            return None
        live, frozen = _half_change(got[0]), _half_change(got[1])
        eps = self.cfg.reward_divergence_min
        return live > eps and frozen < -eps and (
            f"live-D reward {live:+.3f} while the frozen-D reward {frozen:+.3f} over the last "
            f"{self.cfg.health_window} steps: the student is fooling the current "
            "discriminator, not getting closer to the teacher")

    def _d_collapse(self, m: dict):
        if "d/d_acc" not in m:
            return None
        got = self._window("d/d_acc", "d/d_loss")
        if got is None:
            return None
        acc, losses = sum(got[0]) / len(got[0]), got[1]
        self.best_d_acc = max(self.best_d_acc, acc)
        spread = max(losses) - min(losses)
        c = self.cfg
        return (self.best_d_acc >= c.d_collapse_from and abs(acc - 0.5) <= c.d_collapse_tol
                and spread <= c.d_loss_flat_tol) and (
            f"d_acc fell to {acc:.3f} (from {self.best_d_acc:.3f}) while d_loss stayed flat "
            f"(spread {spread:.4f} over {c.health_window} steps): the discriminator has "
            "stopped telling teacher from student, so the reward is noise")


def _half_change(values: list[float]) -> float:
    """Mean of the window's second half minus the mean of its first half."""
    half = len(values) // 2
    return sum(values[-half:]) / half - sum(values[:half]) / half


def _get(m: dict, key: str) -> float | None:
    value = m.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value  # NaN counts as absent
