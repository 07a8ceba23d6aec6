"""Weight sync over a torch.distributed group: the disaggregated path.

The sending trainer rank and the engine's process(es) share a process group (gloo on CPU,
NCCL between GPUs). For each bucket the sender broadcasts a manifest (names, shapes, dtypes),
then every tensor of the bucket in manifest order; `finish()` broadcasts an empty manifest.
The engine side (`receive_broadcast`) allocates each tensor from the manifest, receives it,
and loads the whole bucket with `engine.update_weights`, so it holds at most one bucket.

Tensors travel one broadcast each, not packed into a flat buffer: no copy is made on either
side, so the extra memory stays one bucket (the price is one collective per tensor; NeMo-RL
and slime pack to cut launches, which a later change can do once GPU timings show it pays).
This is the wire pattern SGLang's `update_weights_from_distributed` expects too: per-tensor
broadcasts from one source, in an order the receiver is told beforehand.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gad_megatron.resharding.transport import Bucket

_END = None  # the manifest `finish()` sends


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight sync: unknown dtype {name!r} in a broadcast manifest")
    return dtype


class BroadcastTransport:
    """Sender side: broadcast buckets from global rank `src` over `group`."""

    def __init__(self, group, src: int, device: torch.device | str | None = None):
        self.group, self.src = group, src
        self.device = torch.device(device) if device is not None else None
        self.buckets_sent = 0
        self.bytes_sent = 0

    def send(self, bucket: Bucket) -> None:
        manifest = [(name, tuple(t.shape), str(t.dtype)) for name, t in bucket]
        dist.broadcast_object_list([manifest], src=self.src, group=self.group,
                                   device=self.device)
        for _, tensor in bucket:
            t = tensor.contiguous()
            if self.device is not None:
                t = t.to(self.device)
            dist.broadcast(t, src=self.src, group=self.group)
            self.bytes_sent += t.numel() * t.element_size()
        self.buckets_sent += 1

    def finish(self) -> None:
        dist.broadcast_object_list([_END], src=self.src, group=self.group, device=self.device)


def receive_broadcast(engine, group, src: int,
                      device: torch.device | str = "cpu") -> tuple[int, int]:
    """Engine side: receive buckets from `src` until the sender finishes, loading each into
    `engine.update_weights`. Collective with the sender's sync. Returns (buckets, bytes)."""
    device = torch.device(device)
    buckets = nbytes = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=src, group=group,
                                   device=device if device.type == "cuda" else None)
        manifest = box[0]
        if manifest is _END:
            return buckets, nbytes
        bucket = []
        for name, shape, dtype in manifest:
            t = torch.empty(shape, dtype=_dtype(dtype), device=device)
            dist.broadcast(t, src=src, group=group)
            bucket.append((name, t))
            nbytes += t.numel() * t.element_size()
        engine.update_weights(bucket)
        buckets += 1
