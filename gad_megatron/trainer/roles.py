"""A role (actor, discriminator, reference) as the controller sees it: one object whose calls
fan out to every rank, with the batch split over data-parallel replicas and results taken from
each replica's output rank (last pipeline stage, TP rank 0).

The group underneath is a Ray worker group on a cluster, or `InlineGroup` (one rank in this
process: GPU runs without Ray, and single-rank tests).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from gad_megatron.config.schema import ParallelConfig
from gad_megatron.workers.sequences import Sequences

# Metrics that are the same on every replica (not shares of a global sum).
GLOBAL_METRICS = ("grad_norm", "lr", "update_ok", "num_zeros", "skipped", "nonfinite_loss",
                  "nonfinite_grad")


class Group(Protocol):
    def call(self, method: str, *args, **kwargs) -> list: ...
    def call_per_rank(self, method: str, args_per_rank: list[tuple]) -> list: ...
    def call_per_rank_async(self, method: str, args_per_rank: list[tuple]) -> list: ...
    def wait(self, handles: list, call: str | None = None) -> list: ...
    def shutdown(self) -> None: ...


class InlineGroup:
    """A single rank living in this process (world size 1)."""

    def __init__(self, worker_cls: type, *args, **kwargs):
        self.worker = worker_cls(*args, **kwargs)

    def call(self, method: str, *args, **kwargs) -> list:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def call_per_rank(self, method: str, args_per_rank: list[tuple]) -> list:
        return [getattr(self.worker, method)(*args_per_rank[0])]

    def call_per_rank_async(self, method: str, args_per_rank: list[tuple]) -> list:
        # One process, one device: nothing to overlap with, so the call runs now.
        return self.call_per_rank(method, args_per_rank)

    def wait(self, handles: list, call: str | None = None) -> list:
        return handles

    def shutdown(self) -> None:
        self.worker = None


def rank_coords(rank: int, par: ParallelConfig) -> tuple[int, int, int]:
    """(dp, pp, tp) coordinates of a global rank under Megatron's default order."""
    from gad_megatron.cluster.dispatch import rank_coords as coords

    return coords(rank, par.tp, par.pp, par.dp)


def split_groups(seqs: Sequences, dp: int) -> list[list[int]]:
    """Contiguous, group-preserving index shards for `dp` replicas, balanced by tokens."""
    bounds = [0] + [i for i in range(1, len(seqs)) if seqs.group[i] != seqs.group[i - 1]]
    bounds.append(len(seqs))
    units = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    lengths = seqs.lengths()
    total = sum(lengths)
    shards: list[list[int]] = [[] for _ in range(dp)]
    acc, d = 0, 0
    for u in units:
        # Move to the next shard once this one holds its share of tokens.
        if d < dp - 1 and shards[d] and acc >= total * (d + 1) / dp:
            d += 1
        shards[d].extend(u)
        acc += sum(lengths[i] for i in u)
    return shards


class Role:
    """Fan-out calls over one role's ranks. With `offload` (colocated runs) the role holds
    its device memory only during a call: every call is wrapped in reload ... offload."""

    def __init__(self, name: str, group: Group, parallel: ParallelConfig,
                 offload: bool = False):
        self.name, self.group, self.par, self.offload = name, group, parallel, offload
        self.coords = [rank_coords(r, parallel) for r in range(parallel.world_size)]
        if offload:
            self.group.call("offload")  # the next role to start needs the memory

    @contextmanager
    def _resident(self, weights_only: bool = False):
        if self.offload:
            self.group.call("reload", weights_only)
        yield
        if self.offload:  # not after a failure: the run is ending, nothing to give back to
            self.group.call("offload")

    def call_all(self, method: str, *args) -> list:
        with self._resident():
            return self.group.call(method, *args)

    def call_with_weights(self, method: str, *args) -> list:
        """`call_all` for a call that reads only the weights (a weight sync): an offloaded
        role brings back its weights, not its gradients and optimizer state."""
        with self._resident(weights_only=True):
            return self.group.call(method, *args)

    def _outputs(self, results: list) -> list:
        """Per-replica results, in DP order, from each replica's output rank."""
        last = self.par.pp - 1
        picked = {dp: r for r, (dp, pp, tp) in zip(results, self.coords) if pp == last and tp == 0}
        return [picked[d] for d in range(self.par.dp)]

    def _per_rank(self, seqs: Sequences, shards: list[list[int]], args: tuple) -> list[tuple]:
        """Each rank's arguments: its replica's shard, one object shared by the replica's
        TP/PP ranks (the Ray group then serialises it once per replica)."""
        parts = [seqs.take(shard) for shard in shards]
        return [(parts[dp],) + args for dp, _, _ in self.coords]

    def map_sequences(self, method: str, seqs: Sequences, *args) -> list:
        """Run `method(shard, *args)` with each replica's shard; concatenate the per-sequence
        results back into the original order."""
        return self.start_map(method, seqs, *args).result()

    def start_map(self, method: str, seqs: Sequences, *args) -> "PendingMap":
        """`map_sequences` started, not waited for: the caller overlaps it with work of
        other roles on other devices and takes `.result()` later. A colocated (offloading)
        role runs it at once, since it shares its devices with the others."""
        shards = split_groups(seqs, self.par.dp)
        per_rank = self._per_rank(seqs, shards, args)
        if self.offload:
            with self._resident():
                outs = self.group.call_per_rank(method, per_rank)
            return PendingMap(self, shards, len(seqs), outs, method, done=True)
        handles = self.group.call_per_rank_async(method, per_rank)
        return PendingMap(self, shards, len(seqs), handles, method, done=False)

    def train(self, method: str, seqs: Sequences, *args) -> dict:
        """Run a training step; sum metric shares over replicas (global ones taken once)."""
        shards = split_groups(seqs, self.par.dp)
        per_rank = self._per_rank(seqs, shards, args)
        with self._resident():
            outs = self._outputs(self.group.call_per_rank(method, per_rank))
        merged: dict[str, float] = {}
        for out in outs:
            for k, v in out.items():
                v = float(np.asarray(v))
                merged[k] = v if k in GLOBAL_METRICS else merged.get(k, 0.0) + v
        return merged


@dataclass
class Roles:
    """The started roles of a run, as a backend hands them to the controller."""

    actor: Role
    rollout: Any
    """The engine: `generate`, `start_generate`, `sync_from(actor)`."""
    disc: Role | None
    ref: Role | None
    shutdown: Callable[[], None]
    monitor: Role | None = None


class PendingMap:
    """A started `Role.map_sequences`; `result()` waits and merges in sequence order."""

    def __init__(self, role: Role, shards: list[list[int]], n: int, handles: list,
                 method: str, done: bool):
        self.role, self.shards, self.n, self.method = role, shards, n, method
        self._handles, self._done = handles, done

    def result(self) -> list:
        results = (self._handles if self._done
                   else self.role.group.wait(self._handles, call=self.method))
        merged: list[Any] = [None] * self.n
        for shard, out in zip(self.shards, self.role._outputs(results)):
            for i, value in zip(shard, out):
                merged[i] = value
        return merged


class Ready:
    """A call that already ran, with the `result()` of a started one (in-process roles)."""

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value
