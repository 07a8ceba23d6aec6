"""Multi-rank test harness: run a function on N spawned gloo ranks with Megatron's parallel
state set to (tp, pp, dp), and fail with every rank's traceback."""

from __future__ import annotations

from typing import Any, Callable

from gad_megatron.parallel.launch import spawn_ranks


def _rank_entry(rank: int, world: int, tp: int, pp: int, fn: Callable, args: tuple) -> Any:
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed, shutdown

    init_distributed(ParallelLayout(tp=tp, pp=pp, dp=world // (tp * pp)))
    try:
        return fn(rank, *args)
    finally:
        shutdown()


def run_parallel(fn: Callable, tp: int = 1, pp: int = 1, dp: int = 1, args: tuple = (),
                 timeout_s: float = 300.0) -> list[Any]:
    """`fn(rank, *args)` on tp*pp*dp ranks; returns per-rank results in rank order."""
    world = tp * pp * dp
    return spawn_ranks(_rank_entry, world, args=(tp, pp, fn, args), timeout_s=timeout_s)
