"""One role as a group of Ray actors, one per rank, with its own torch.distributed world.

The worker class is a plain class: it never imports Ray. Each rank's actor gets the
rendezvous environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) before its
constructor runs, so the constructor can call `init_process_group` like under torchrun.

Every wait goes through `wait_for`, which turns a dead, failing or silent rank into a
`WorkerError` naming the role and the rank, and never blocks longer than the timeout. When one
rank fails its peers are usually blocked in a collective that will never complete, so the
group kills all its actors after a failure.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"
TRACE_LINES = 6
"""Last lines of a remote traceback carried in a WorkerError."""
GRACE_S = 3.0
"""After a first failure, how long to wait for the others: a rank that raised a gloo error
because its peer died must not hide that death."""


class WorkerError(RuntimeError):
    """A worker rank died, raised, or did not answer in time ("discriminator rank 1 died: ...")."""

    def __init__(self, role: str, rank: int | None, message: str):
        where = f"{role} rank {rank}" if rank is not None else role
        super().__init__(f"{where} {message}")
        self.role, self.rank, self.detail = role, rank, message


@dataclass(frozen=True)
class RankInfo:
    """Where one rank runs (asked from the actor itself once it is constructed)."""

    rank: int
    node: str
    pid: int
    local_rank: int
    gpu_ids: tuple


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _tail(text: str, lines: int = TRACE_LINES, limit: int = 1500) -> str:
    """The informative end of a remote error: no colour codes, no caret-only lines."""
    kept = [ln for ln in _ANSI.sub("", text).strip().splitlines()
            if ln.strip() and set(ln.strip()) - set("^~")]
    return "\n".join(kept[-lines:])[-limit:]


def _death_reason(text: str) -> str:
    """Ray's actor-death text without its id card and boilerplate: why, plus pid and node."""
    lines = _ANSI.sub("", text).strip().splitlines()
    card = dict(ln.strip().split(": ", 1) for ln in lines
                if ln.startswith("\t") and ": " in ln)
    rest = " ".join(ln.strip() for ln in lines if not ln.startswith("\t"))
    rest = rest.split(" Some common causes")[0]  # Ray's generic troubleshooting list
    where = ", ".join(f"{k} {card[k]}" for k in ("pid", "ip") if k in card)
    return _tail(rest + (f" ({where})" if where else ""))


def _describe(exc: BaseException) -> tuple[int, str, str]:
    """(severity, verb, detail) of one failed ref: a death outranks an exception."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayActorError) and getattr(exc, "actor_init_failed", False):
        return 0, "died", "its constructor raised:\n" + _tail(str(exc))
    if isinstance(exc, rex.RayActorError):
        return 0, "died", _death_reason(str(exc))
    if isinstance(exc, rex.RayTaskError):
        return 1, "raised", _tail(str(exc))
    return 1, "failed", f"{type(exc).__name__}: {exc}"


def _gather_failures(refs: list, first: dict[Any, BaseException], timeout_s: float) -> dict:
    """All refs that fail within `timeout_s` (beyond those already in `first`)."""
    import ray

    failures = dict(first)
    pending = [r for r in refs if r not in failures]
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1,
                                  timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - collected, reported below
                failures[ref] = exc
    return failures


def _error_from(role: str, rank_of: dict, failures: dict) -> WorkerError:
    described = sorted((*_describe(exc), rank_of[ref]) for ref, exc in failures.items())
    _, verb, detail, rank = described[0]
    message = f"{verb}: {detail}"
    others = [f"rank {r} {v}: {d.splitlines()[-1]}" for _, v, d, r in described[1:]]
    if others:
        message += "\n(also " + "; ".join(others) + ")"
    return WorkerError(role, rank, message)


def wait_for(role: str, refs: list, timeout_s: float, ranks: list[int] | None = None,
             grace_s: float = GRACE_S, call: str | None = None) -> list:
    """Results of `refs` in order. A failure or the timeout raises WorkerError naming the
    role and the rank (a dead rank first, then the lowest failing rank), and on a timeout
    the `call` that was waited for."""
    import ray

    ranks = ranks if ranks is not None else list(range(len(refs)))
    rank_of = dict(zip(refs, ranks))
    results: dict[Any, Any] = {}
    pending = list(refs)
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            late = sorted(rank_of[r] for r in pending)
            what = f" {call}()" if call else ""
            raise WorkerError(role, late[0], f"did not answer{what} within {timeout_s:g}s "
                                             f"(ranks still busy: {late})")
        # Short polls: a dead actor's ref turns ready at once, so this is only a bound.
        ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, 1.0))
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
                # A death is the root cause already; an exception may be a peer's reaction
                # to a death that Ray has not reported yet, so give that a moment.
                grace = 0.0 if _describe(exc)[0] == 0 else min(grace_s, max(left, 0))
                failures = _gather_failures(pending, {ref: exc}, grace)
                raise _error_from(role, rank_of, failures) from None
    return [results[ref] for ref in refs]


def _put_shared(args_per_rank: list[tuple]) -> list[tuple]:
    """An argument object given to several ranks (a DP replica's shard, for its TP and PP
    ranks) goes into the object store once and travels as a reference: Ray would otherwise
    serialise it again for every call. Ray hands each rank the value, not the reference."""
    import ray

    count: dict[int, int] = {}
    for args in args_per_rank:
        for a in args:
            count[id(a)] = count.get(id(a), 0) + 1
    refs: dict[int, Any] = {}
    for args in args_per_rank:
        for a in args:
            small = isinstance(a, (bool, int, float, str, type(None)))
            if count[id(a)] > 1 and id(a) not in refs and not small:
                refs[id(a)] = ray.put(a)
    return [tuple(refs.get(id(a), a) for a in args) for args in args_per_rank]


def bundle_resources(bundle) -> dict[str, float]:
    """A placement `Bundle` as Ray resources."""
    res = {"CPU": float(bundle.cpus)}
    if bundle.gpus:
        res["GPU"] = float(bundle.gpus)
    if bundle.node:
        # Ray gives every node a resource named after its address: a sliver of it pins the
        # bundle to the node the plan chose.
        res[f"node:{bundle.node}"] = 0.001
    return res


def reserve(bundles, name: str, timeout_s: float, role: str = "placement"):
    """A Ray placement group of `bundles` (placement.Bundle), ready, or WorkerError."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    one_node = len({b.node for b in bundles}) == 1 and bool(bundles[0].node)
    pg = placement_group([bundle_resources(b) for b in bundles],
                         strategy="STRICT_PACK" if one_node else "PACK", name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        gpus, cpus = sum(b.gpus for b in bundles), sum(b.cpus for b in bundles)
        raise WorkerError(role, None, f"could not reserve {len(bundles)} bundle(s) "
                                      f"({gpus} GPUs, {cpus:g} CPUs) within {timeout_s:g}s")
    return pg


def _rank_info(worker: Any, rank: int) -> RankInfo:
    """Runs inside the actor (through `__ray_call__`): where this rank ended up."""
    import ray

    ctx = ray.get_runtime_context()
    gpus = tuple(ctx.get_accelerator_ids().get("GPU", ()))
    return RankInfo(rank, ray.util.get_node_ip_address(), os.getpid(),
                    int(os.environ.get("LOCAL_RANK", "0")), gpus)


def _probe_rendezvous() -> tuple[str, int]:
    """Runs on rank 0's node: its address and a port free there."""
    import ray

    from gad_megatron.parallel.launch import free_port

    ip = ray.util.get_node_ip_address()
    return ip, free_port(ip)


class RayWorkerGroup:
    """`world_size` Ray actors of `worker_cls`, rank r constructed as
    `worker_cls(*ctor_args)` with the rendezvous environment of rank r.

    `placement` (a `RolePlacement` from `plan_placement(...).role(name)`) pins each rank to
    its planned node and sets its device share; None lets Ray pack the ranks where it can.
    `env` adds variables for every rank (the rendezvous variables always win).
    `master_addr` overrides rank 0's address on a multi-node cluster; `local` (None: every
    Ray node is on loopback) makes ranks rendezvous on 127.0.0.1 through the `lo` interface.
    `timeout_s` bounds every call; `start_timeout_s` (None: `timeout_s`) bounds the
    reservation and the constructors (loading a model can take longer than a step).
    `pg`: the placement group a colocated placement shares with the other roles (required
    then; the group neither creates nor removes it). Each rank's actor sits on the bundle
    and takes the device fraction of its planned `Seat`.
    """

    def __init__(self, role: str, worker_cls: type, world_size: int, ctor_args: tuple = (),
                 placement=None, timeout_s: float = 600.0, env: dict | None = None, *,
                 use_gpus: bool | None = None, master_addr: str | None = None,
                 local: bool | None = None, start_timeout_s: float | None = None, pg=None):
        from gad_megatron.cluster.runtime import is_local_cluster

        if placement is not None and placement.world_size != world_size:
            raise ValueError(f"{role}: placement has {placement.world_size} ranks, "
                             f"world_size is {world_size}")
        self.role, self.world_size, self.timeout_s = role, world_size, timeout_s
        self.placement = placement
        self.use_gpus = placement.use_gpus if placement is not None else bool(use_gpus)
        self.local = is_local_cluster() if local is None else local
        self.actors: list = []
        if pg is None and placement is not None and placement.share > 1:
            raise ValueError(f"{role}: a colocated placement needs the shared reservation "
                             f"(pg=reserve(plan.bundles(COLOCATED), ...))")
        self.pg, self.owns_pg = pg, False
        self.ranks: list[RankInfo] = []
        self.start_timeout_s = timeout_s if start_timeout_s is None else start_timeout_s
        try:
            self._reserve()
            addr, port = self._rendezvous(master_addr)
            self._spawn(worker_cls, ctor_args, env or {}, addr, port)
            self.master_addr, self.master_port = addr, port
            # Also the barrier: answers only once every constructor has returned.
            refs = self.call_per_rank_async("__ray_call__",
                                            [(_rank_info, r) for r in range(world_size)])
            self.ranks = wait_for(role, refs, self.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    @property
    def pids(self) -> list[int]:
        return [info.pid for info in self.ranks]

    def _seat(self, rank: int):
        from gad_megatron.cluster.placement import Seat

        if self.placement is None:  # unplanned: one whole device per rank, Ray packs them
            return Seat(rank, 1.0 if self.use_gpus else 0.0, 1.0, (rank,))
        return self.placement.seats[rank]

    def _reserve(self) -> None:
        from gad_megatron.cluster.placement import Bundle

        if self.pg is not None:
            return  # a reservation shared with other roles (colocated), owned by the caller
        if self.placement is not None:
            bundles = self.placement.bundles
        else:
            bundles = tuple(Bundle("", 1 if self.use_gpus else 0, 1.0)
                            for _ in range(self.world_size))
        self.pg = reserve(bundles, f"{self.role}-{os.getpid()}-{id(self)}",
                          self.start_timeout_s, self.role)
        self.owns_pg = True

    def _strategy(self, rank: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=self._seat(rank).bundle)

    def _rendezvous(self, master_addr: str | None) -> tuple[str, int]:
        """Rank 0's address and a free port there for this role's process group."""
        from gad_megatron.parallel.launch import free_port

        if self.local:
            return LOOPBACK, free_port(LOOPBACK)
        import ray

        probe = ray.remote(num_cpus=0)(_probe_rendezvous).options(
            scheduling_strategy=self._strategy(0))
        addr, port = wait_for(self.role, [probe.remote()], self.start_timeout_s, ranks=[0])[0]
        return master_addr or addr, port

    def _rank_env(self, rank: int, base: dict, addr: str, port: int) -> dict[str, str]:
        from gad_megatron.cluster.runtime import worker_env

        # A GPU actor sees only its own GPU (Ray narrows CUDA_VISIBLE_DEVICES): index 0.
        if self.use_gpus:
            local_rank = 0
        else:
            local_rank = self.placement.device_of(rank) if self.placement is not None else rank
        env = {**worker_env(local=self.local), "OMP_NUM_THREADS": "1",
               **{k: str(v) for k, v in base.items()}}
        env.update(RANK=str(rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local_rank),
                   MASTER_ADDR=addr, MASTER_PORT=str(port))
        if self.local:
            env.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
        return env

    def _spawn(self, worker_cls: type, ctor_args: tuple, env: dict, addr: str,
               port: int) -> None:
        import ray

        remote_cls = ray.remote(worker_cls)
        for rank in range(self.world_size):
            seat = self._seat(rank)
            self.actors.append(remote_cls.options(
                num_cpus=seat.cpus, num_gpus=seat.gpus, max_restarts=0,
                scheduling_strategy=self._strategy(rank),
                runtime_env={"env_vars": self._rank_env(rank, env, addr, port)},
            ).remote(*ctor_args))

    # ---- calls -------------------------------------------------------------------------

    def call_async(self, method: str, *args, **kwargs) -> list:
        """Start `method(*args, **kwargs)` on every rank; the refs, in rank order."""
        self._check_alive()
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_per_rank_async(self, method: str, args_per_rank: list[tuple]) -> list:
        """Start `method(*args_per_rank[r])` on rank r; the refs, in rank order."""
        self._check_alive()
        if len(args_per_rank) != self.world_size:
            raise ValueError(f"{self.role}: {len(args_per_rank)} argument tuples for "
                             f"{self.world_size} ranks")
        args_per_rank = _put_shared(args_per_rank)
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, args_per_rank)]

    def wait(self, refs: list, call: str | None = None) -> list:
        """Results of refs from `call_async` (rank order). On any failure or the timeout the
        whole group is killed, then WorkerError is raised, naming the rank's node."""
        try:
            return wait_for(self.role, refs, self.timeout_s, call=call)
        except WorkerError as err:
            where = self._where(err.rank)
            self.shutdown()  # peers of a failed rank would block in their next collective
            if where is None or "ip " in err.detail:
                raise
            raise WorkerError(err.role, err.rank, f"{err.detail} ({where})") from None

    def _where(self, rank: int | None) -> str | None:
        """'node ADDR, pid N' of a rank, as it reported itself at start."""
        if rank is None or rank >= len(self.ranks):
            return None
        info = self.ranks[rank]
        return f"node {info.node}, pid {info.pid}"

    def call(self, method: str, *args, **kwargs) -> list:
        """`method(*args, **kwargs)` on every rank; results in rank order."""
        return self.wait(self.call_async(method, *args, **kwargs), call=method)

    def call_per_rank(self, method: str, args_per_rank: list[tuple]) -> list:
        """`method(*args_per_rank[r])` on rank r; results in rank order."""
        return self.wait(self.call_per_rank_async(method, args_per_rank), call=method)

    def _check_alive(self) -> None:
        if not self.actors:
            raise WorkerError(self.role, None, "is shut down (an earlier failure killed it)")

    def shutdown(self) -> None:
        """Kill every rank and release the reservation; safe to call twice."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.pg is not None and self.owns_pg:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - Ray already shut down
                pass
        self.pg = None
