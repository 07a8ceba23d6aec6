"""Hypothesis budgets of the fuzz tests: `ci` (the default, part of `make test`: each fuzz
file well under 30 s on a 2-core machine) and `fuzz` (thousands of examples, `make fuzz`).

GAD_FUZZ_PROFILE picks one; `make fuzz` sets it to `fuzz`.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Deadlines off: on a shared 2-core machine one slow example is load, not a bug.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("fuzz", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("GAD_FUZZ_PROFILE", "ci"))


def budget(ci: int) -> int:
    """Examples for one property: `ci` under the ci profile, 25x that under `fuzz`."""
    return ci * 25 if os.environ.get("GAD_FUZZ_PROFILE") == "fuzz" else ci
