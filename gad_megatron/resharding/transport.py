"""Where a weight-sync bucket goes. On the one sending trainer rank (see execute.py) a
transport gets `begin(manifest)` once, `send(bucket)` once per bucket, in order, then
`finish()`.

Implemented here are the transports the CPU tests can run:
- `InProcessTransport`: the engine lives in the sending process (colocated, or a single-GPU
  run without Ray); buckets go straight into `engine.update_weights`.
- `CallbackTransport`: any function that ships a bucket (tests, benchmarks).

`broadcast.GroupTransport` sends buckets over a weight group of their own (gloo on CPU, NCCL
on GPUs) to an engine in another process: the Ray backend's path for every engine, and the
inline path into vLLM's workers. CUDA IPC between colocated processes is designed in
docs/weight_sync.md.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

Bucket = list[tuple[str, torch.Tensor]]


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as manifests name it: 'bfloat16', not 'torch.bfloat16'."""
    return str(dtype).removeprefix("torch.")


class Transport(Protocol):
    def begin(self, manifest: list) -> None:
        """The whole sync's [name, shape, dtype] list, before any bucket: a transport whose
        engine cannot take it refuses here, while no weight has changed yet."""

    def send(self, bucket: Bucket) -> None:
        """Deliver one bucket of HF-named full tensors; the caller may reuse the memory after."""

    def finish(self) -> None:
        """Every bucket was sent: flush anything pending (the engine may serve again)."""


class InProcessTransport:
    """Load buckets into an engine living in this process."""

    def __init__(self, engine):
        self.engine = engine
        self.buckets_sent = 0
        self.bytes_sent = 0

    def begin(self, manifest: list) -> None:
        pass  # the engine checks each bucket whole before copying any of it

    def send(self, bucket: Bucket) -> None:
        self.engine.update_weights(bucket)
        self.buckets_sent += 1
        self.bytes_sent += sum(t.numel() * t.element_size() for _, t in bucket)

    def finish(self) -> None:
        pass  # update_weights is synchronous: nothing is in flight


class CallbackTransport:
    """Hand each bucket to `fn(bucket)`; `on_finish()` (optional) runs at the end."""

    def __init__(self, fn: Callable[[Bucket], object],
                 on_finish: Callable[[], object] | None = None):
        self.fn, self.on_finish = fn, on_finish
        self.buckets_sent = 0

    def begin(self, manifest: list) -> None:
        pass

    def send(self, bucket: Bucket) -> None:
        self.fn(bucket)
        self.buckets_sent += 1

    def finish(self) -> None:
        if self.on_finish is not None:
            self.on_finish()
