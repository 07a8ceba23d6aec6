"""One role as a group of Ray actors, one per rank, with its own torch.distributed world.

Every wait goes through `wait_for`, which turns a dead, failing or silent rank into a
`WorkerError` naming the role and the rank, and never blocks longer than the timeout: when
one rank dies its peers are usually stuck in a collective, so the whole group is killed.
"""

from __future__ import annotations

import time
from typing import Any

LOOPBACK = "127.0.0.1"


class WorkerError(RuntimeError):
    """A worker rank died, raised, or did not answer in time."""

    def __init__(self, role: str, rank: int, message: str):
        super().__init__(f"{role} rank {rank} {message}")
        self.role, self.rank = role, rank


def _describe(exc: BaseException) -> str:
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        lines = str(exc).strip().splitlines()
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else lines[-1]
        return f"raised {detail}"
    if isinstance(exc, rex.RayActorError):
        return f"died ({str(exc).strip().splitlines()[0][:300]})"
    return f"failed: {type(exc).__name__}: {exc}"


def wait_for(role: str, refs: list, timeout_s: float, ranks: list[int] | None = None) -> list:
    """Results of `refs` in order; the first failure (or the timeout) raises WorkerError."""
    import ray

    ranks = ranks if ranks is not None else list(range(len(refs)))
    rank_of = {ref: r for ref, r in zip(refs, ranks)}
    results: dict[Any, Any] = {}
    pending = list(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerError(role, rank_of[pending[0]],
                              f"did not answer within {timeout_s:.0f}s")
        ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 1.0))
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
                raise WorkerError(role, rank_of[ref], _describe(exc)) from None
    return [results[ref] for ref in refs]


class RayWorkerGroup:
    """`world_size` Ray actors of `worker_cls`, constructed with `ctor_args` and the
    rendezvous environment of their rank."""

    def __init__(self, role: str, worker_cls: type, world_size: int, ctor_args: tuple,
                 placement=None, timeout_s: float = 600.0, use_gpus: bool = False,
                 master_addr: str = LOOPBACK):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from gad_megatron.cluster.runtime import worker_env
        from gad_megatron.parallel.launch import free_port

        self.role, self.world_size, self.timeout_s = role, world_size, timeout_s
        bundle = {"CPU": 1, "GPU": 1} if use_gpus else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
        ray.get(self.pg.ready(), timeout=timeout_s)
        port = free_port(master_addr)
        remote_cls = ray.remote(worker_cls)
        self.actors = []
        for rank in range(world_size):
            env = worker_env(local=master_addr == LOOPBACK)
            env.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr,
                       MASTER_PORT=str(port), LOCAL_RANK="0" if use_gpus else str(rank))
            self.actors.append(remote_cls.options(
                num_cpus=1, num_gpus=1 if use_gpus else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank),
                runtime_env={"env_vars": env}).remote(*ctor_args))
        try:
            self.pids = self.call("pid")  # waits until every constructor has finished
        except WorkerError:
            self.shutdown()
            raise

    def call(self, method: str, *args, **kwargs) -> list:
        """`method(*args)` on every rank; results in rank order."""
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return self._wait(refs)

    def call_per_rank(self, method: str, args_per_rank: list[tuple]) -> list:
        """`method(*args_per_rank[r])` on rank r."""
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.actors, args_per_rank)]
        return self._wait(refs)

    def _wait(self, refs: list) -> list:
        try:
            return wait_for(self.role, refs, self.timeout_s)
        except WorkerError:
            self.shutdown()  # peers of a dead rank would block in their next collective
            raise

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if getattr(self, "pg", None) is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - Ray already shut down
                pass
            self.pg = None
