"""Rules of thumb from the original GAD work, watched step by step. Warnings, never stops."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the health watch (the `tracking.health` section)."""

    d_acc_low: float = 0.55
    """d_acc below this for `patience` steps: D is not learning."""
    d_acc_high: float = 0.9
    """d_acc above this for `patience` steps: D is over-confident and G gets no signal."""
    patience: int = 5
    """Consecutive steps a condition must hold before it warns."""
    score_gap_max: float = 10.0
    """Teacher-student score gap above this: D's sigmoid saturates."""
    clip_frac_low: float = 0.1
    """Policy clip fraction below this (checked only with more than one pass per batch)."""
    clip_frac_high: float = 0.3
    """Policy clip fraction above this: updates too large for the clip range."""
    length_ratio_min: float = 0.5
    """Student/teacher mean length below this."""
    length_ratio_max: float = 2.0
    """Student/teacher mean length above this: reward hacking by length."""


class HealthWatch:
    """`update(step, metrics)` returns (name, message) for the warnings that newly fire; a
    warning re-arms once its condition clears."""

    def __init__(self, cfg: HealthConfig, clip_checks: bool = True):
        self.cfg, self.clip_checks = cfg, clip_checks
        self.streak: dict[str, int] = {}
        self.active: set[str] = set()

    def _conditions(self, m: dict) -> dict[str, str]:
        c, out = self.cfg, {}
        acc = m.get("d/d_acc")
        if acc is not None and acc < c.d_acc_low:
            out["d_acc_low"] = f"d_acc {acc:.2f} < {c.d_acc_low}: the discriminator is not learning"
        if acc is not None and acc > c.d_acc_high:
            out["d_acc_high"] = (f"d_acc {acc:.2f} > {c.d_acc_high}: the discriminator is "
                                 "over-confident; the generator gets little signal")
        gap = m.get("d/score_gap")
        if gap is not None and abs(gap) > c.score_gap_max:
            out["score_gap"] = f"score gap {gap:.2f} > {c.score_gap_max}: D's sigmoid saturates"
        clip = m.get("g/clip_frac")
        if self.clip_checks and clip is not None and not c.clip_frac_low <= clip <= c.clip_frac_high:
            out["clip_frac"] = (f"clip fraction {clip:.3f} outside "
                                f"[{c.clip_frac_low}, {c.clip_frac_high}]")
        s, t = m.get("g/response_len_mean"), m.get("g/teacher_len_mean")
        if s is not None and t:
            ratio = s / t
            if not c.length_ratio_min <= ratio <= c.length_ratio_max:
                out["length_ratio"] = (f"student/teacher length {ratio:.2f} outside "
                                       f"[{c.length_ratio_min}, {c.length_ratio_max}]: "
                                       "possible reward hacking")
        return out

    def update(self, step: int, metrics: dict) -> list[tuple[str, str]]:
        now = self._conditions(metrics)
        fired = []
        for name in list(self.streak):
            if name not in now:
                self.streak.pop(name)
                self.active.discard(name)
        for name, message in now.items():
            self.streak[name] = self.streak.get(name, 0) + 1
            if self.streak[name] >= self.cfg.patience and name not in self.active:
                self.active.add(name)
                fired.append((name, f"step {step}: {message}"))
        return fired
