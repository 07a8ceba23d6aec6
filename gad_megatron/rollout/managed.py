"""How the trainer drives an engine: its constructor options, and its sleep/wake rhythm.

`engine_options` is a pure function of the config: the rollout settings each engine kind
takes (the GPU share of vLLM/SGLang, the device and dtype of the hf engine). Before it, the
GPU memory share was never passed and the hf engine on a GPU machine decoded on the CPU in
fp32.

`SleepingEngine` keeps an engine asleep between uses when the devices are shared with the
trainer (colocated), so the engine's weights and KV cache do not sit in memory the actor,
discriminator and reference need for their steps. Order, per step:
generate = wake, sample, sleep; weight sync = wake, every bucket, `end_sync` sleeps (or, over
a weight group: wake, receive the whole sync, sleep).
A sync always follows a wake, so an engine whose sleep drops its weights (SGLang without a
CPU backup) still serves the weights the sync sent.
"""

from __future__ import annotations

from typing import Iterable

import torch

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


def engine_options(kind: str, dtype: str, use_gpus: bool, gpu_memory_utilization: float,
                   deterministic: bool = True) -> dict:
    """Constructor options of `make_engine(kind, ...)` beyond the model and ids.

    `dtype` is the run's parameter dtype name (model.dtype). The hf engine runs on the GPU
    Ray gave its actor (`cuda`, index 0 of its visible devices) when `use_gpus`; vLLM and
    SGLang take the share of GPU memory they may hold and the dtype by name.
    """
    if kind == "hf":
        if not use_gpus:
            return {"device": "cpu", "dtype": torch.float32}  # CPU kernels: fp32
        return {"device": "cuda", "dtype": _TORCH_DTYPES[dtype]}
    opts = {"dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization}
    if kind == "sglang":
        opts["deterministic"] = deterministic
    return opts


class SleepingEngine:
    """An engine that is awake only while it samples or receives weights (when `enabled`).
    Weights arrive bucket by bucket (`update_weights`, then `end_sync`), or as one whole sync
    over a weight group (`join_weight_group` once, then `receive_weights`)."""

    def __init__(self, engine, enabled: bool, sync_timeout_s: float = 600.0):
        from gad_megatron.rollout.receiver import receiver_for

        self.engine, self.enabled = engine, enabled
        self.receiver = receiver_for(engine, sync_timeout_s)
        self.awake = True
        self._sleep()  # the trainer's models come next: leave them the memory

    def _wake(self) -> None:
        if self.enabled and not self.awake:
            self.engine.wake()
            self.awake = True

    def _sleep(self) -> None:
        if self.enabled and self.awake:
            self.engine.sleep()
            self.awake = False

    def generate(self, *args, **kwargs):
        self._wake()
        try:
            return self.engine.generate(*args, **kwargs)
        finally:
            self._sleep()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._wake()  # stays awake for the rest of the sync; `end_sync` puts it back to sleep
        self.engine.update_weights(named_tensors)

    def end_sync(self) -> None:
        self._sleep()

    @property
    def weight_receivers(self) -> int:
        return self.receiver.weight_receivers

    def join_weight_group(self, addr: str, port: int, world: int, first_rank: int,
                          backend: str = "gloo") -> None:
        self.receiver.join_weight_group(addr, port, world, first_rank, backend)

    def receive_weights(self) -> tuple[int, int]:
        self._wake()
        try:
            return self.receiver.receive_weights()
        finally:
            self._sleep()
