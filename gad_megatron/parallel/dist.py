"""torch.distributed + Megatron parallel state, the same way on CPU (gloo) and GPU (NCCL)."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """How one role's Megatron ranks are split (the `parallel` section of each role's config).
    The role takes world_size = tp * pp * dp devices (or CPU slots)."""

    tp: int = 1
    """Tensor-parallel size: each layer's weights split across this many ranks."""
    pp: int = 1
    """Pipeline-parallel size: layers split into this many consecutive stages."""
    dp: int = 1
    """Data-parallel size: replicas that each see a slice of the batch."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def device() -> torch.device:
    """This rank's compute device: its local GPU, or the CPU when CUDA is absent."""
    if torch.cuda.is_available() and not os.environ.get("GAD_FORCE_CPU_PATCHES") == "1":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


_STORES: dict[tuple[str, int], "dist.TCPStore"] = {}


def _loopback_store(rank: int, world: int):
    """The rendezvous store when MASTER_ADDR is a loopback address, else None (env://).

    torch's own rank-0 TCPStore listens on every interface ('::') whatever MASTER_ADDR
    says; here rank 0 binds the listening socket to MASTER_ADDR itself and hands it over,
    so a local job opens no port beyond loopback. One store per address and port in a
    process, as env:// does (multi-tenant), so a re-initialised group reuses it."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr.startswith("127.") or not port:
        return None
    key = (addr, int(port))
    if key not in _STORES:
        timeout = datetime.timedelta(minutes=30)  # init_process_group's default
        if rank != 0:
            _STORES[key] = dist.TCPStore(addr, key[1], world, is_master=False, timeout=timeout)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(key)
            sock.listen(1024)
            # detach: the store owns the descriptor from here on.
            _STORES[key] = dist.TCPStore(addr, key[1], world, is_master=True,
                                         master_listen_fd=sock.detach(), timeout=timeout)
    return _STORES[key]


def init_distributed(layout: ParallelLayout, seed: int = 1234) -> None:
    """Start the process group (if needed) and Megatron's parallel state for `layout`.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment (torchrun, the
    spawn launcher, or a Ray worker set them). On CPU the gloo backend is used and
    megatron_patches are applied first.
    """
    import megatron_patches

    on_cpu = device().type == "cpu"
    if on_cpu:
        megatron_patches.apply()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world == 1 and "MASTER_PORT" not in os.environ:
            from gad_megatron.parallel.launch import free_port, pin_loopback_env

            pin_loopback_env(free_port())
        if not on_cpu:
            torch.cuda.set_device(device())
        dist.init_process_group("gloo" if on_cpu else "nccl", rank=rank, world_size=world,
                                store=_loopback_store(rank, world))
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"parallel layout tp={layout.tp} pp={layout.pp} dp={layout.dp} needs "
            f"{layout.world_size} ranks, but the process group has {dist.get_world_size()}"
        )
    from megatron.core import parallel_state, tensor_parallel

    if not _same_layout(layout):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _same_layout(layout: ParallelLayout) -> bool:
    """Whether Megatron's groups already are `layout`'s. Then they are kept: the roles of an
    inline run share one process and one layout, and each fresh set of groups would leave the
    old ones' gloo threads behind (torch keeps every group it made until the default group
    is destroyed): ~100 threads per inline run, 1,700 in one test file."""
    from megatron.core import parallel_state as ps

    return (ps.model_parallel_is_initialized()
            and ps.get_tensor_model_parallel_world_size() == layout.tp
            and ps.get_pipeline_model_parallel_world_size() == layout.pp)


def shutdown() -> None:
    """Tear down Megatron's parallel state and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
