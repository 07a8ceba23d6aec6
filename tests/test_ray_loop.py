"""The full system through Ray: real Megatron worker groups (actor at TP=2), the hf engine in
its own actor, weight sync by broadcast over a weight group (never through the object
store), warmup then gad; and a killed worker surfacing as an error that names its role and
rank."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest

from gad_megatron.cluster.group import WorkerError
from gad_megatron.trainer.controller import train
from gad_megatron.trainer.ray_backend import start_ray_roles
from gad_megatron.trainer.setup import resolve_inputs
from tests.tiny_models import small_run


def ray_cfg(tmp_path, stage, *extra):
    return small_run(tmp_path, stage, stage, "train.steps=2", "train.d_only_steps=1",
                     "rollout.max_new_tokens=8", "run.num_cpus=16", "run.worker_timeout_s=120",
                     *extra)


@pytest.fixture(scope="module")
def shared_ray(tmp_path_factory):
    """One local Ray (127.0.0.1, 16 slots) for the tests after the first: `train` and
    `start_ray_roles` keep a Ray they did not start, as the demo's driver does. The first
    test starts and stops its own, and asserts that it is stopped."""
    from gad_megatron.cluster.runtime import start_ray, stop_ray

    start_ray(ray_cfg(tmp_path_factory.mktemp("ray"), "warmup").run)
    yield
    stop_ray()


def test_warmup_then_gad_through_ray(tmp_path):
    import ray

    from gad_megatron.cluster.runtime import node_addresses

    warm = ray_cfg(tmp_path, "warmup", "actor.parallel.tp=2")
    seen_nodes = []
    history = train(warm, backend="ray",
                    on_step=lambda s, m: seen_nodes.extend(node_addresses()) if s == 0 else None)
    assert seen_nodes and all(a.startswith("127.") for a in seen_nodes), seen_nodes
    assert not ray.is_initialized()
    assert "g/sft_loss" in history[1] and "g/sft_loss" not in history[0]
    # One-step off-policy: step 1's generation runs on the engine actor during step 0.
    gad = ray_cfg(tmp_path, "gad", "actor.parallel.pp=2", "rollout.max_staleness=1",
                  f"train.init_from={tmp_path / 'warmup'}")
    history = train(gad, backend="ray")
    assert [m["rollout/staleness"] for m in history] == [0.0, 1.0]
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        for phase in ("rollout", "logprobs", "score", "d_update", "g_update", "weight_sync"):
            assert metrics[f"time/{phase}"] > 0
        assert metrics["perf/tokens_per_s"] > 0 and metrics["perf/rollout_tokens_per_s"] > 0
    assert history[0]["g/ref_logprob_max_diff"] < 1e-5  # actor == reference at step 0
    assert history[0]["g/engine_logprob_max_diff"] < 1e-4
    assert (tmp_path / "gad" / "checkpoints" / "latest").is_file()


def test_a_layout_the_cluster_cannot_hold_is_refused_before_any_worker(tmp_path):
    # Its own Ray of 2 slots, started before the shared one (placement reads the live cluster).
    from gad_megatron.cluster.placement import PlacementError

    cfg = ray_cfg(tmp_path, "warmup", "run.num_cpus=2", "actor.parallel.tp=2")
    with pytest.raises(PlacementError, match="discriminator: needs 1 devices"):
        start_ray_roles(cfg, resolve_inputs(cfg), total_steps=1)
    import ray

    assert not ray.is_initialized()  # the Ray it started for nothing is stopped


def test_a_killed_worker_is_reported_by_role_and_rank(tmp_path, shared_ray):
    cfg = ray_cfg(tmp_path, "warmup", "discriminator.parallel.tp=2")
    roles = start_ray_roles(cfg, resolve_inputs(cfg), total_steps=2)
    try:
        pids = roles.disc.group.pids
        os.kill(pids[1], signal.SIGKILL)
        start = time.monotonic()
        from gad_megatron.workers.sequences import Sequences

        with pytest.raises(WorkerError, match=r"discriminator rank [01] died"):
            roles.disc.map_sequences("scores", Sequences([[1, 5, 6]], [[7, 2]]))
        assert time.monotonic() - start < 60
    finally:
        roles.shutdown()


def _store_bytes_created() -> int:
    """Bytes ever put in Ray's object store, cluster-wide (a cumulative counter)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    # This test's own Ray by its address: another file's Ray may run beside it (make test -j 2),
    # and without an address Ray refuses to choose ("Found multiple active Ray instances").
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.cumulative_created_bytes


def test_no_weight_bucket_goes_through_the_object_store(tmp_path, shared_ray):
    """A sync of ~5 MB of weights adds (next to) nothing to the object store: the buckets go
    by broadcast from the actor's sending rank into the engine's process."""
    cfg = ray_cfg(tmp_path, "warmup", "model.tiny_hidden=256", "actor.parallel.tp=2")
    roles = start_ray_roles(cfg, resolve_inputs(cfg), total_steps=2)
    try:
        for _ in range(2):  # the first sync also opens the weight group
            before = _store_bytes_created()
            buckets, nbytes = roles.rollout.sync_from(roles.actor)
            created = _store_bytes_created() - before
            assert nbytes > 4 << 20 and buckets >= 1
            assert created < 64 << 10, f"{created} bytes went through the object store"
    finally:
        roles.shutdown()


@pytest.mark.slow  # a second warmup + gad through Ray (~1.5 min): in `make test-all` (CI), not the quick `make test`
def test_colocated_warmup_then_gad_through_ray(tmp_path, shared_ray):
    """Issue 14, defects 4, 5 and 8, and issue 11's colocation, end to end on CPU slots:
    every role (engine included) seated in one shared reservation, the engine asleep between
    uses, each trainer role offloaded to host memory between its calls; warmup then gad."""
    cfg = ray_cfg(tmp_path, "warmup", "actor.parallel.tp=2", "run.colocate=true")
    history = train(cfg, backend="ray")
    assert len(history) == 2 and "g/sft_loss" in history[1]
    gad = ray_cfg(tmp_path, "gad", "run.colocate=true", f"train.init_from={tmp_path / 'warmup'}")
    history += train(gad, backend="ray")
    assert len(history) == 4 and all("g/pg_loss" in m for m in history[2:])
    assert [m["rollout/staleness"] for m in history] == [0.0] * 4
    for metrics in history:
        assert all(math.isfinite(v) for v in metrics.values()), metrics
