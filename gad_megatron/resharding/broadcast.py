"""Weight sync over a `WeightGroup`: one wire protocol for every engine (hf, vLLM, SGLang).

Rank 0 (the actor's sending rank) drives; every other rank receives every tensor, since the
engine loads full HF tensors and cuts its own TP shards. Messages, in order:

1. `begin`: the whole sync's manifest (name, shape, dtype of every tensor). Each receiver
   checks it against the weights its engine holds and answers with a verdict (a JSON
   broadcast of its own). Any refusal ends the sync on every rank with `SyncMismatch`
   naming the tensor, before a single weight has changed.
2. `bucket`: the bucket's manifest, then its tensors, one broadcast each in manifest order.
   The receiver allocates each from the manifest and loads the bucket once it is whole, so
   it holds at most one bucket.
3. `end`: the engine may serve again.

Tensors travel one broadcast each, not packed into a flat buffer: no copy is made on either
side, so the extra memory stays one bucket (the price is one collective per tensor; NeMo-RL
and slime pack to cut launches, which a later change can do once GPU timings show it pays).
SGLang's `update_weights_from_distributed` cannot take part as it is: it expects bare tensor
broadcasts, with the manifest given to it out of band, so SGLang receives through the
process that holds it (rollout/receiver.py).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from gad_megatron.resharding.execute import SyncMismatch
from gad_megatron.resharding.transport import Bucket, dtype_name
from gad_megatron.resharding.weight_group import WeightGroup

Manifest = list  # [[name, [shape...], dtype name], ...]
Expected = dict  # name -> (shape tuple, dtype name): what an engine holds


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SyncMismatch(f"weight sync: unknown dtype {name!r} in a manifest")
    return dtype


def describe(named: Iterable[tuple[str, torch.Tensor]]) -> Manifest:
    return [[name, list(t.shape), dtype_name(t.dtype)] for name, t in named]


def check_manifest(manifest: Manifest, expected: Expected, complete: bool) -> str | None:
    """Why an engine holding `expected` cannot take `manifest` (None: it can). `complete`:
    the manifest claims to cover every weight, so a weight it leaves out would go stale."""
    seen = set()
    for name, shape, dtype in manifest:
        if name not in expected:
            return f"{name!r} is not a weight of the engine's model"
        want_shape, want_dtype = expected[name]
        if tuple(shape) != tuple(want_shape):
            return f"{name!r} has shape {list(shape)}, the engine holds {list(want_shape)}"
        if dtype != want_dtype:
            return f"{name!r} is {dtype}, the engine holds {want_dtype}"
        if name in seen:
            return f"{name!r} is sent twice"
        seen.add(name)
    missing = sorted(set(expected) - seen) if complete else []
    if missing:
        return (f"{len(missing)} weights of the engine's model are not sent and would stay "
                f"stale, e.g. {missing[:3]}")
    return None


def _verdicts(group: WeightGroup, mine: str | None) -> list[str]:
    """Every receiver's verdict on the manifest, on every rank (one broadcast each)."""
    return [v for v in (group.broadcast_json(mine if group.rank == r else None, src=r)
                        for r in range(1, group.world)) if v]


class GroupTransport:
    """Sender side (rank 0 of `group`): the transport `sync_weights` drives."""

    def __init__(self, group: WeightGroup):
        if group.rank != 0:
            raise ValueError("GroupTransport sends from rank 0 of its weight group")
        self.group = group
        self.buckets_sent = 0
        self.bytes_sent = 0

    def begin(self, manifest: Manifest, complete: bool = True) -> None:
        self.group.broadcast_json({"op": "begin", "tensors": manifest, "complete": complete})
        refused = _verdicts(self.group, None)
        if refused:
            raise SyncMismatch(f"weight sync refused by the engine: {refused[0]}")

    def send(self, bucket: Bucket) -> None:
        self.group.broadcast_json({"op": "bucket", "tensors": describe(bucket)})
        for _, tensor in bucket:
            t = tensor.detach().contiguous().to(self.group.device)
            self.group.broadcast(t, src=0)
            self.bytes_sent += t.numel() * t.element_size()
        self.buckets_sent += 1

    def finish(self) -> None:
        self.group.broadcast_json({"op": "end"})


def receive_weights(group: WeightGroup, load: Callable[[Bucket], object],
                    expected: Expected, begin: Callable[[], object] | None = None,
                    end: Callable[[], object] | None = None) -> tuple[int, int]:
    """Receiver side: take one sync from rank 0, loading each bucket with `load`. Collective
    with the sender's sync. Raises `SyncMismatch` (after telling the sender) when the
    manifest does not fit `expected`. `begin` runs once the manifest is accepted (before the
    first bucket), `end` after the last bucket. Returns (buckets, bytes)."""
    buckets = nbytes = 0
    announced: dict | None = None
    while True:
        msg = group.broadcast_json(src=0)
        if msg["op"] == "end":
            if announced is not None and end is not None:
                end()
            return buckets, nbytes
        if msg["op"] == "begin":
            refused = _verdicts(group, check_manifest(msg["tensors"], expected,
                                                       msg["complete"]))
            if refused:
                raise SyncMismatch(f"weight sync refused by the engine: {refused[0]}")
            announced = {name: (tuple(shape), dtype) for name, shape, dtype in msg["tensors"]}
            if begin is not None:
                begin()
            continue
        if announced is None:
            raise SyncMismatch("weight sync: a bucket arrived before its manifest")
        bucket = []
        for name, shape, dtype in msg["tensors"]:
            if announced.get(name) != (tuple(shape), dtype):
                raise SyncMismatch(f"weight sync: {name!r} {shape} {dtype} was not announced")
            t = torch.empty(shape, dtype=to_dtype(dtype), device=group.device)
            group.broadcast(t, src=0)
            bucket.append((name, t))
            nbytes += t.numel() * t.element_size()
        load(bucket)
        buckets += 1
