"""RayWorkerGroup on a local, loopback-only Ray: a toy plain worker class (no Ray inside)
does gloo collectives; failures surface as WorkerError naming role and rank, never as a hang.
One Ray instance serves the whole module (starting it costs seconds).

Module-level imports stay light: every Ray worker imports this module to build ToyWorker."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest


class ToyWorker:
    """A plain class: joins the gloo world its environment describes, like a Megatron worker."""

    def __init__(self, fail_rank: int = -1):
        rank = int(os.environ["RANK"])
        if rank == fail_rank:
            raise RuntimeError(f"constructor refused on rank {rank}")
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=timedelta(seconds=120))

    def env(self) -> dict:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS", "TOY_FLAG")
        return {k: os.environ.get(k) for k in keys}

    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def pid(self) -> int:
        return os.getpid()

    def allreduce(self, x: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()

    def allreduce_after(self, x: float, delay_s: float) -> float:
        time.sleep(delay_s)
        return self.allreduce(x)

    def hang(self, seconds: float) -> None:
        time.sleep(seconds)

    def busy_span(self, seqs, seconds: float) -> list[tuple[float, float]]:
        """Work of `seconds` on a shard of sequences; its wall-clock (start, end) per one."""
        start = time.time()
        time.sleep(seconds)
        return [(start, time.time())] * len(seqs)

    def raise_error(self, message: str) -> None:
        raise ValueError(message)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from gad_megatron.cluster.runtime import start_ray, stop_ray
    from gad_megatron.config.schema import RunConfig

    owned = not ray.is_initialized()
    start_ray(RunConfig(num_cpus=16))
    yield
    if owned:
        stop_ray()


@pytest.fixture
def pair(ray_local):
    from gad_megatron.cluster.group import RayWorkerGroup

    group = RayWorkerGroup("toy", ToyWorker, 2, (), None, timeout_s=300,
                           env={"TOY_FLAG": "on"})
    yield group
    group.shutdown()


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_local_ray_stays_on_loopback(ray_local):
    import ray

    from gad_megatron.cluster.runtime import node_addresses

    addresses = node_addresses()
    assert addresses and all(a.startswith("127.") for a in addresses), addresses
    assert ray.get_runtime_context().gcs_address.startswith("127.")
    assert ray.cluster_resources()["CPU"] == 16


def test_allreduce_through_ray_then_a_raised_exception_names_role_rank_and_message(pair):
    from gad_megatron.cluster.group import WorkerError

    assert pair.call_per_rank("allreduce", [(1.5,), (2.0,)]) == [3.5, 3.5]
    assert pair.wait(pair.call_async("allreduce", 1.0)) == [2.0, 2.0]
    assert pair.call("rank") == [0, 1]
    envs = pair.call("env")
    port = envs[0]["MASTER_PORT"]
    for rank, env in enumerate(envs):
        assert env == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                       "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TOY_FLAG": "on"}
    assert [i.rank for i in pair.ranks] == [0, 1] and pair.pids == pair.call("pid")
    assert all(i.node.startswith("127.") for i in pair.ranks)

    pids = pair.pids
    with pytest.raises(WorkerError) as err:
        pair.call_per_rank("raise_error", [("fine",), ("bad weights in layer 3",)])
    # both ranks raised; the lowest rank is named with its traceback, the other one too
    assert err.value.role == "toy" and err.value.rank == 0
    text = str(err.value)
    assert text.startswith("toy rank 0 raised") and "ValueError: fine" in text
    assert 'raise ValueError(message)' in text
    assert "rank 1 raised: ValueError: bad weights in layer 3" in text
    # the group is gone after a failure: no rank is left blocked in a collective
    assert all(_gone(pid, 20) for pid in pids)
    with pytest.raises(WorkerError, match="toy is shut down"):
        pair.call("rank")


def test_a_killed_worker_surfaces_while_its_peer_is_blocked_in_a_collective(pair):
    from gad_megatron.cluster.group import WorkerError

    pids = pair.pids
    # rank 0 enters the all-reduce at once and blocks there; rank 1 sleeps first
    refs = pair.call_per_rank_async("allreduce_after", [(1.0, 0.0), (2.0, 120.0)])
    time.sleep(1.0)
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"^toy rank 1 died") as err:
        pair.wait(refs)
    assert time.monotonic() - start < 60
    # rank 0's gloo error ("connection closed by peer") is the consequence, not the cause
    assert err.value.rank == 1 and "(pid " in str(err.value)
    assert _gone(pids[0], 20), "the blocked peer was not killed with its group"


def test_a_call_past_the_timeout_names_role_and_rank(ray_local):
    from gad_megatron.cluster.group import RayWorkerGroup, WorkerError

    group = RayWorkerGroup("discriminator", ToyWorker, 2, (), None, timeout_s=2.0,
                           start_timeout_s=60)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"^discriminator rank 1 did not answer hang\(\) "
                                              r"within 2s \(ranks still busy: \[1\]\) "
                                              r"\(node 127\.0\.0\.1, pid \d+\)"):
            group.call_per_rank("hang", [(0.0,), (60.0,)])
        assert time.monotonic() - start < 15
    finally:
        group.shutdown()


def test_a_failing_constructor_names_its_rank(ray_local):
    from gad_megatron.cluster.group import RayWorkerGroup, WorkerError

    with pytest.raises(WorkerError, match=r"^reference rank 1 died") as err:
        RayWorkerGroup("reference", ToyWorker, 2, (1,), None, timeout_s=60)
    assert "its constructor raised" in str(err.value)
    assert "RuntimeError: constructor refused on rank 1" in str(err.value)


def test_planned_placement_and_probed_rendezvous(ray_local):
    from gad_megatron.cluster.group import RayWorkerGroup
    from gad_megatron.cluster.placement import RoleSpec, plan_placement
    from gad_megatron.cluster.runtime import cluster_nodes

    plan = plan_placement({"actor": RoleSpec("actor", 2, tp=2), "reference": RoleSpec(
        "reference", 1)}, cluster_nodes(use_gpus=False), colocate=False, use_gpus=False)
    # local=False takes the multi-node path: rank 0's node is asked for its address and a
    # free port (on this loopback-only Ray that node is 127.0.0.1).
    group = RayWorkerGroup("reference", ToyWorker, 1, (), plan.role("reference"),
                           timeout_s=60, local=False)
    try:
        assert group.master_addr == "127.0.0.1"
        assert group.call("env")[0]["LOCAL_RANK"] == "2"  # its planned CPU slot
        assert group.call("allreduce", 4.0) == [4.0]
    finally:
        group.shutdown()


def _placement_group_id(worker) -> str:
    """Runs inside an actor: the placement group Ray charged it to."""
    import ray

    return ray.get_runtime_context().get_placement_group_id()


def test_colocated_roles_share_one_reservation_rank_r_on_bundle_r(ray_local):
    """Issue 14, defect 5, on Ray itself (CPU slots stand in for GPUs): colocated roles sit
    in one reservation of whole bundles, never one of their own."""
    from ray.util.placement_group import remove_placement_group

    from gad_megatron.cluster.group import RayWorkerGroup, reserve
    from gad_megatron.cluster.placement import COLOCATED, RoleSpec, plan_placement
    from gad_megatron.cluster.runtime import cluster_nodes

    plan = plan_placement([RoleSpec("actor", 2, tp=2), RoleSpec("discriminator", 2)],
                          cluster_nodes(use_gpus=False), colocate=True, use_gpus=False)
    with pytest.raises(ValueError, match="shared reservation"):
        RayWorkerGroup("actor", ToyWorker, 2, (), plan.role("actor"), timeout_s=60)
    shared = reserve(plan.bundles(COLOCATED), "test-colocated", 60)
    groups = []
    try:
        for role in ("actor", "discriminator"):
            groups.append(RayWorkerGroup(role, ToyWorker, 2, (), plan.role(role),
                                         timeout_s=60, pg=shared))
        for g in groups:
            # Every rank of every role is charged to the one shared reservation (its bundle
            # r is what the plan's Seat says: see the tables in test_placement.py).
            refs = g.call_per_rank_async("__ray_call__", [(_placement_group_id,)] * 2)
            assert g.wait(refs) == [shared.id.hex()] * 2
            assert [g._seat(r).bundle for r in range(2)] == [0, 1]
            assert g.call("allreduce", 1.0) == [2.0, 2.0]
    finally:
        for g in groups:
            g.shutdown()
        remove_placement_group(shared)


def test_two_roles_started_together_run_at_the_same_time(ray_local):
    """Role.start_map (the reference's log-probs and D's scores in a gad step) leaves the
    call running: two roles on their own workers overlap in time; result() merges."""
    from gad_megatron.cluster.group import RayWorkerGroup
    from gad_megatron.config.schema import ParallelConfig
    from gad_megatron.trainer.roles import Role
    from gad_megatron.workers.sequences import Sequences

    groups = [RayWorkerGroup(name, ToyWorker, 1, (), None, timeout_s=300) for name in "ab"]
    try:
        a, b = (Role(g.role, g, ParallelConfig()) for g in groups)
        seqs = Sequences([[1], [2], [3]], [[4], [5], [6]])
        pending = [a.start_map("busy_span", seqs, 1.0), b.start_map("busy_span", seqs, 1.0)]
        (a_span, *rest_a), (b_span, *_) = (p.result() for p in pending)
        assert len(rest_a) == 2 and all(s == a_span for s in rest_a)
        assert a_span[0] < b_span[1] and b_span[0] < a_span[1], (a_span, b_span)
    finally:
        for g in groups:
            g.shutdown()


def test_an_argument_shared_by_ranks_is_put_into_the_object_store_once(ray_local):
    """A DP replica's shard given to its TP ranks travels as one object-store reference;
    an argument of one rank, and small values, travel as they are."""
    import ray

    from gad_megatron.cluster.group import _put_shared

    shard, alone = [1, 2, 3], [4]
    out = _put_shared([(shard, 0.5), (shard, 0.5), (alone, 0.5)])
    assert isinstance(out[0][0], ray.ObjectRef) and out[0][0] is out[1][0]
    assert out[2][0] is alone and [args[1] for args in out] == [0.5, 0.5, 0.5]
    assert ray.get(out[0][0]) == shard
