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
    """7.62B parameters, TP2 DP4: per GPU 3.81B, so params 7.6 GB, grads 15.2, Adam
    12 x 3.81 / 4 = 11.4; the engine at 0.5 x 80 = 40 GB. The sync holds both."""
    m = est.QWEN_7B
    per_gpu = m.params() / 2
    phases = est.colocated_phases(m, 1)
    static = (2 + 4 + 12 / 4) * per_gpu
    assert phases["rollout (engine awake)"] == pytest.approx(40e9)
    assert phases["weight sync (actor + engine)"] == pytest.approx(static + 40e9)
    assert phases["weight sync (actor + engine)"] / 1e9 == pytest.approx(74.3, abs=0.05)
    # The actor's update equals the disaggregated actor at the same TP2 DP4 (2-node table).
    assert phases["actor update"] == pytest.approx(
        sum(est.trained(m, 2, 1, 4, 4096, lm_head=True).values()))
    assert max(phases.values()) == phases["weight sync (actor + engine)"]


def test_the_table_says_what_does_not_fit():
    rows = est.colocated_table(est.QWEN_14B, 1)
    assert any("weight sync" in r and "DOES NOT FIT" in r for r in rows)
    assert all("DOES NOT FIT" not in r for r in est.colocated_table(est.QWEN_14B, 2))
