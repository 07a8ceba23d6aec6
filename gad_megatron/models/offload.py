"""Move a role's weights, gradients and optimizer state to host memory and back.

Colocated roles time-share the same GPUs, so between its calls each role gives its device
memory back (`offload`) and takes it again before the next one (`reload`). The unit is a
tensor *storage*, not a tensor: Megatron's DDP keeps the parameters and gradients of a
bucket as views into one contiguous buffer, and the distributed optimizer's fp32 master
shards are views too. Copying each storage to host and resizing it to 0 bytes frees the
device memory while every view keeps its shape, stride and offset; `reload` grows the same
storage object back and copies the bytes in, so every view (the parameters the model
holds, the `main_grad`s the DDP hooks write, the optimizer's references) is again exactly
what it was, bit for bit, without any of them being rebuilt.

On a CPU machine both sides are host memory, but the round trip is the same (storages
freed, re-allocated, refilled), which is what the CPU tests check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class HostCopy:
    """Storages given back by `offload`, with the bytes to put in them again."""

    storages: list
    """The emptied storages (the objects the tensors still point at)."""
    hosts: list
    """Their bytes, in host memory (pinned where CUDA is present), in the same order."""

    @property
    def nbytes(self) -> int:
        return sum(h.numel() for h in self.hosts)


def _bytes_view(storage) -> torch.Tensor:
    """A uint8 tensor over the whole of `storage` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def unique_storages(tensors: Iterable[torch.Tensor]) -> list:
    """The distinct non-empty storages behind `tensors`, in first-seen order."""
    seen, out = set(), []
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        out.append(storage)
    return out


def offload(tensors: Iterable[torch.Tensor]) -> HostCopy:
    """Copy every storage behind `tensors` to host memory, then free it (resize to 0)."""
    pin = torch.cuda.is_available()
    storages, hosts = unique_storages(tensors), []
    for storage in storages:
        host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu", pin_memory=pin)
        host.copy_(_bytes_view(storage))
        hosts.append(host)
    for storage in storages:  # freed only once all are copied: a failure loses nothing
        storage.resize_(0)
    return HostCopy(storages, hosts)


def reload(copy: HostCopy) -> None:
    """Grow every storage back to its size and copy its bytes in."""
    for storage, host in zip(copy.storages, copy.hosts):
        storage.resize_(host.numel())
        _bytes_view(storage).copy_(host)


def weight_tensors(model) -> list[torch.Tensor]:
    """What a forward pass or a weight export reads: the model's parameters and buffers
    (with the distributed optimizer the parameters are views into DDP's `param_data`)."""
    params = [p.data for p in model.parameters()] + [b for _, b in model.named_buffers()]
    return params + [b.param_data for b in _ddp_list(model) if b.param_data is not None]


def state_tensors(model, optimizer) -> list[torch.Tensor]:
    """What only a training step needs besides the weights: DDP's gradient buffers, the
    tensors Adam updates (the parameters themselves, or their fp32 master copies) and
    Adam's state."""
    return [b.grad_data for b in _ddp_list(model)] + _optimizer_tensors(optimizer)


def training_tensors(model, optimizer=None) -> list[torch.Tensor]:
    """Everything a role keeps between its calls."""
    return weight_tensors(model) + (state_tensors(model, optimizer) if optimizer else [])


def _ddp_list(model) -> list:
    """Megatron DDP's contiguous buffers. Its instance attribute `buffers` (a list) hides
    nn.Module's `buffers()` method, hence the look-up in `__dict__`."""
    return [b for attr in ("buffers", "expert_parallel_buffers")
            for b in model.__dict__.get(attr) or []]


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    out = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            out += [p.data for p in group["params"]]
        for state in inner.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out
