"""Spawn N torch.distributed ranks on this host and collect each rank's result or traceback.

Used by the multi-rank tests and by the CLI commands that need several ranks on a CPU machine
(e.g. `convert hf-to-megatron --tp 2`). Ranks talk only on loopback: gloo would otherwise pick
the host's routable interface.
"""

from __future__ import annotations

import os
import pickle
import random
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"


class RankFailure(RuntimeError):
    """One or more spawned ranks raised or died; the message holds every rank's traceback."""


@dataclass(frozen=True)
class RankEnv:
    """Rendezvous settings handed to each spawned rank."""

    world_size: int
    master_port: int
    backend: str = "gloo"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now, chosen below the ephemeral range.

    Binding port 0 would return an ephemeral port, and between this probe and the real bind
    any outgoing connection on the host (gloo opens many) may take that same port: CI saw
    "Address already in use" that way. Ports below the range are only ever taken by
    listeners, which the probe sees. 20000 is above Ray's default worker ports (10002-19999)."""
    low, _ = _ephemeral_range()
    start, stop = (20000, low) if low > 22000 else (low, 65536)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(start, stop)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded host
        s.bind((host, 0))
        return s.getsockname()[1]


def pin_loopback_env(port: int | None = None) -> None:
    """Point gloo/NCCL rendezvous at loopback unless the caller already chose an address."""
    os.environ.setdefault("MASTER_ADDR", LOOPBACK)
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def _rank_main(rank: int, env: RankEnv, fn: Callable, args: tuple, results: Any) -> None:
    # Environment before anything imports torch.distributed state.
    os.environ["MASTER_ADDR"] = LOOPBACK
    os.environ["MASTER_PORT"] = str(env.master_port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(env.world_size)
    try:
        out = fn(rank, env.world_size, *args)
        # Plain pickle copies tensors by value; torch's queue would pass shared-memory handles
        # that die with this process before the parent reads them.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its trace
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown of a failed group is best effort
                pass


def spawn_ranks(
    fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 600.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes.

    `fn` must be importable by module path (the `spawn` start method re-imports it). Returns
    the per-rank return values, in rank order. Raises RankFailure naming every rank that
    raised, died, or did not report within `timeout_s`; the other ranks are then terminated,
    so a hang in one rank never hangs the caller.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env = RankEnv(world_size=world_size, master_port=free_port(), backend=backend)
    procs = [
        ctx.Process(target=_rank_main, args=(r, env, fn, args, results), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < world_size:
        try:
            rank, ok, payload = results.get(timeout=0.5)
            outcomes[rank] = (ok, pickle.loads(payload) if ok else payload)
            if not ok:
                failures[rank] = payload
                # Peers of a failed rank usually block in a collective: give them a moment to
                # report their own error, then stop waiting.
                deadline = min(deadline, time.monotonic() + 10.0)
        except queue.Empty:
            pass
        for r, p in enumerate(procs):
            if r not in outcomes and not p.is_alive() and p.exitcode not in (None, 0):
                outcomes[r] = (False, None)
                failures[r] = f"process exited with code {p.exitcode} before reporting"
        if time.monotonic() > deadline:
            for r in range(world_size):
                if r not in outcomes:
                    failures.setdefault(r, f"no result within the time limit ({timeout_s:.0f}s)")
            break
    for p in procs:
        p.join(timeout=5.0)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5.0)
    if failures:
        parts = [f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures)]
        raise RankFailure(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(parts))
    return [outcomes[r][1] for r in range(world_size)]
