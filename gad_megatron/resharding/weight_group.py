"""A process group of its own for weight sync, between a trainer rank and an engine.

Rank 0 is the actor's sending rank (TP 0, PP 0, DP 0); ranks 1.. are the engine's receivers
(the engine host process, or each of vLLM's worker processes). The group is built from its
own TCPStore and a `ProcessGroupGloo` / `ProcessGroupNCCL` object, never through
`init_process_group`: both sides already have a default group (Megatron's on the trainer,
vLLM's TP group in its workers) that this one must not replace or join.

Only tensors travel here, each in one broadcast from rank 0; small control messages (the
manifest, a verdict) are JSON bytes in a uint8 tensor, never pickles, so a receiver runs no
code it was sent.
"""

from __future__ import annotations

import datetime
import json
import socket

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


def _store(addr: str, port: int, world: int, rank: int, timeout: datetime.timedelta):
    if rank != 0:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    # Rank 0 binds the listening socket to `addr` itself: torch's own master store listens on
    # every interface, and a local job must open nothing beyond loopback.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(64)
    return dist.TCPStore(addr, port, world, is_master=True, master_listen_fd=sock.detach(),
                         timeout=timeout)


class WeightGroup:
    """`world` processes joined at `addr:port`; this one is `rank`. Collective to build."""

    def __init__(self, addr: str, port: int, world: int, rank: int, backend: str = "gloo",
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if not 0 <= rank < world:
            raise ValueError(f"weight group: rank {rank} is outside a world of {world}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight group: backend must be gloo or nccl, got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.world, self.rank = world, rank
        self.store = _store(addr, port, world, rank, timeout)
        prefixed = dist.PrefixStore("gad-weight-sync/", self.store)
        if backend == "gloo":
            # Reads GLOO_SOCKET_IFNAME like init_process_group does (`lo` on a local job).
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world, timeout)
            self.device = torch.device("cpu")
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast `tensor` in place from rank `src` (it must be on `self.device`)."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    def broadcast_json(self, obj=None, src: int = 0):
        """Broadcast a JSON-able object from `src`; every rank returns it."""
        if self.rank == src:
            payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        size = self.broadcast(size.to(self.device), src)
        if self.rank != src:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        data = self.broadcast(payload.to(self.device), src).cpu()
        return json.loads(bytes(data.numpy()).decode())
