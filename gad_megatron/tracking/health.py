"""Training-health rules over the per-step metrics: warnings for a human, never a stop.

GAD fails quietly: a discriminator that never learns (d_acc ~ 0.5) hands the student noise as
reward, one that wins outright (d_acc ~ 1, huge score gap) hands it no gradient, and a student
that games D often does it through answer length. Each rule here watches one of these; it
reports once when its condition starts and is re-armed when the condition clears.
"""

from __future__ import annotations

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
        ]

    def update(self, step: int, metrics: dict) -> list[HealthWarning]:
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


def _get(m: dict, key: str) -> float | None:
    value = m.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if value != value else value  # NaN counts as absent
