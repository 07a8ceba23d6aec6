"""The colocated memory plan (slurm/memory_estimate.py) against numbers worked out by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "memory_estimate", Path(__file__).resolve().parent.parent / "slurm" / "memory_estimate.py")
est = importlib.util.module_from_spec(_spec)
sys.modules["memory_estimate"] = est  # its dataclasses look their module up there
_spec.loader.exec_module(est)


def test_colocated_7b_on_one_node_by_hand():
    """7.62B parameters, TP2 DP4: per GPU 3.81B, so bf16 params 7.6 GB; the engine at
    0.5 x 80 = 40 GB. The sync holds the actor's weights (alone) beside the engine."""
    m = est.QWEN_7B
    per_gpu = m.params() / 2
    phases = est.colocated_phases(m, 1)
    assert phases["rollout (engine awake)"] == pytest.approx(40e9)
    assert phases["weight sync (actor + engine)"] == pytest.approx(2 * per_gpu + 40e9)
    assert phases["weight sync (actor + engine)"] / 1e9 == pytest.approx(47.6, abs=0.05)
    # The actor's update equals the disaggregated actor at the same TP2 DP4 (2-node table).
    assert phases["actor update"] == pytest.approx(
        sum(est.trained(m, 2, 1, 4, 4096, lm_head=True).values()))
    assert max(phases.values()) == phases["weight sync (actor + engine)"]


def test_14b_fits_one_node_colocated_its_peak_the_actor_update():
    phases = est.colocated_phases(est.QWEN_14B, 1)
    assert max(phases, key=phases.get) == "actor update"
    assert phases["actor update"] / 1e9 == pytest.approx(58.9, abs=0.05)
    assert all("DOES NOT FIT" not in r for r in est.colocated_table(est.QWEN_14B, 1))
