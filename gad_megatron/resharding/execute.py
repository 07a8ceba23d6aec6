"""Run a weight sync: stream the actor's weights, as HF tensors, into a rollout engine.

`sync_weights` is a collective over the actor's ranks. Inside each data-parallel replica the
TP x PP group drains `export_hf_tensors` (each parameter gathered over TP on its stage, merged
into HF tensors, broadcast to the other stages); the replicas hold identical weights, so only
replica 0 exports and the others return at once. The sending rank (TP 0, PP 0, DP 0) packs
the stream into buckets of at most `bucket_bytes` (a larger tensor travels alone) and hands
each to `transport.send`, then calls `transport.finish()`. The other ranks only take part in
the collectives. Peak extra memory on the sender: one bucket plus the parameter being gathered.

Every tensor put in a bucket owns exactly its bytes (`owned`): at TP=1 the export yields live
parameters, and with the distributed optimizer those are views into one contiguous buffer.
Pickling (Ray's object store) or CUDA-IPC sharing of a view ships its whole storage, so a 7B
sync would send the 15 GB buffer once per small tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gad_megatron.checkpoint.hf_io import export_hf_tensors
from gad_megatron.models.hf_config import HFArch
from gad_megatron.resharding.plan import closes_before, param_metas
from gad_megatron.resharding.transport import dtype_name


class SyncMismatch(RuntimeError):
    """The exported stream disagrees with the plan's manifest (a missing, extra or
    wrong-shaped tensor): the engine would be left with stale weights."""


@dataclass
class SyncStats:
    """What the sending rank did (other ranks report zeros)."""

    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    peak_bucket_bytes: int = 0
    seconds: float = 0.0


def _ranks() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_world_size())


def is_sender() -> bool:
    """True on the one actor rank that talks to the transport: TP 0, PP 0, DP 0."""
    tp_rank, pp_rank, dp_rank, _ = _ranks()
    return tp_rank == 0 and pp_rank == 0 and dp_rank == 0


def owns_storage(tensor) -> bool:
    """Whether `tensor` is exactly its storage: contiguous, offset 0, nothing more stored."""
    nbytes = tensor.numel() * tensor.element_size()
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == nbytes)


def owned(tensor):
    """`tensor` itself when it owns its storage exactly, else a compact copy (detached)."""
    tensor = tensor.detach()
    return tensor if owns_storage(tensor) else tensor.clone(memory_format=torch.contiguous_format)


class _Bucketer:
    """Packs (name, tensor) into buckets with the plan's rule and sends each one when full."""

    def __init__(self, transport, bucket_bytes: int, stats: SyncStats):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.transport, self.bucket_bytes, self.stats = transport, bucket_bytes, stats
        self.items: list = []
        self.used = 0

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if closes_before(self.used, len(self.items), nbytes, self.bucket_bytes):
            self.flush()
        self.items.append((name, owned(tensor)))  # never a view into a larger storage
        self.used += nbytes

    def flush(self) -> None:
        if not self.items:
            return
        self.transport.send(self.items)
        self.stats.buckets += 1
        self.stats.tensors += len(self.items)
        self.stats.bytes += self.used
        self.stats.peak_bucket_bytes = max(self.stats.peak_bucket_bytes, self.used)
        self.items, self.used = [], 0  # drop our references: the bucket's memory can go


def _check(name: str, shape, expected: dict, seen: set) -> None:
    if name not in expected:
        raise SyncMismatch(f"weight sync: exported tensor {name!r} is not in the plan")
    if tuple(shape) != expected[name]:
        raise SyncMismatch(f"weight sync: {name!r} has shape {list(shape)}, the plan says "
                           f"{list(expected[name])}")
    if name in seen:
        raise SyncMismatch(f"weight sync: {name!r} exported twice")
    seen.add(name)


def _first_param(model):
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for p in chunk.parameters():
            return p
    raise ValueError("weight sync: the model has no parameters")


def sync_weights(model, arch: HFArch, transport, bucket_bytes: int) -> SyncStats:
    """Send the model's weights (HF names, full tensors) through `transport`. Collective."""
    start = time.perf_counter()
    stats = SyncStats()
    _, _, dp_rank, pp = _ranks()
    if dp_rank != 0:
        return stats  # same weights as replica 0, whose export is a separate collective
    sender = is_sender()
    expected = {n: s for m in param_metas(arch, pp) for n, s in zip(m.hf_names, m.hf_shapes)}
    seen: set[str] = set()
    bucketer = None
    if sender:
        dtype = dtype_name(_first_param(model).dtype)
        transport.begin([[n, list(s), dtype] for n, s in expected.items()])
        bucketer = _Bucketer(transport, bucket_bytes, stats)
    for name, tensor in export_hf_tensors(model, arch):
        if bucketer is None:
            continue  # every rank of the replica must drain the collective generator
        _check(name, tensor.shape, expected, seen)
        bucketer.add(name, tensor)
    if bucketer is not None:
        bucketer.flush()
        missing = sorted(set(expected) - seen)
        if missing:
            raise SyncMismatch(f"weight sync: {len(missing)} planned tensors were never "
                               f"exported, e.g. {missing[:3]}")
        transport.finish()
    stats.seconds = time.perf_counter() - start
    return stats
