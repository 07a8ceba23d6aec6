"""Run Megatron-Core 0.16.1 on CPU over gloo.

Megatron-Core assumes CUDA in a few dozen places: `torch.cuda.current_device()` as an
allocation device, tensors created with `device="cuda"`, the CUDA RNG behind the
tensor-parallel RNG tracker, streams and events in the pipeline schedule, and type strings such
as `'torch.cuda.FloatTensor'` in optimizer checks. Rather than fork those files, this package
redirects the CUDA entry points they use to the CPU, so the *unmodified* Megatron code (models,
1F1B schedule, DDP, optimizers, dist_checkpointing) runs in tests and on CPU machines.

`apply()` is a no-op when CUDA is present unless `force=True`; production on GPUs never loads
these patches. Every patch carries a one-line reason (see `PATCHES`), and `applied()` lists
what is active.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import os
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

SUPPORTED_MEGATRON = ("0.16.1",)

_CPU = torch.device("cpu")
_applied: list[str] = []


@dataclass(frozen=True)
class Patch:
    """One redirect: what it replaces, why, and the function that installs it."""

    target: str
    reason: str
    install: Callable[[], None]


class UnsupportedMegatronVersion(RuntimeError):
    """The installed megatron-core is not a version these patches were written and tested for."""


# --------------------------------------------------------------------------------------------
# Device redirection
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # torch reads a bare int as a CUDA ordinal
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _redirect_device_kwarg(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    wrapper.__gad_cpu_patch__ = True  # type: ignore[attr-defined]
    return wrapper


# Factories Megatron calls with device=torch.cuda.current_device() or device="cuda".
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "as_tensor", "empty_strided", "linspace", "eye", "tril_indices", "triu_indices",
)


class _TorchProxy(types.ModuleType):
    """`torch` as Megatron's modules see it: the real module, but with factories that map a
    CUDA device to the CPU. Other libraries in the process (transformers) keep the real
    factories: replacing them globally breaks transformers' lazy weight initialisation."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _redirect_device_kwarg(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_PROXY: _TorchProxy | None = None


def _swap_torch(module) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _PROXY


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Gives megatron.* modules imported later (many are imported lazily) the proxy too."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def patched_exec(module, _exec=exec_module):
                    _exec(module)
                    _swap_torch(module)

                spec.loader.exec_module = patched_exec
                return spec
            if spec is not None:
                return spec
        return None


def _install_factories() -> None:
    global _PROXY
    _PROXY = _TorchProxy()
    sys.meta_path.insert(0, _MegatronImportHook())
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.") and module is not None:
            _swap_torch(module)


def _install_tensor_moves() -> None:
    orig_to = torch.Tensor.to

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU,) + args[1:]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return orig_to(self, *args, **kwargs)

    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    torch.Tensor.to = to
    torch.Tensor.cuda = cuda
    torch.nn.Module.cuda = lambda self, device=None: self


def _install_tensor_type() -> None:
    # Optimizer and grad-clip checks compare `param.type()` with 'torch.cuda.FloatTensor'.
    orig_type = torch.Tensor.type

    @functools.wraps(orig_type)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch."):]
            return name
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


# --------------------------------------------------------------------------------------------
# torch.cuda module: current device, RNG, streams, events, memory queries
# --------------------------------------------------------------------------------------------


class _NullStream:
    """Stands in for torch.cuda.Stream: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    """Stands in for torch.cuda.Event; elapsed_time is 0 (timers use wall clock on CPU)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _install_torch_cuda() -> None:
    c = torch.cuda
    c.current_device = lambda: "cpu"  # used as `device=`; "cpu" keeps it off the CUDA path
    c.device_count = lambda: 0
    c.synchronize = lambda device=None: None
    c.get_rng_state = lambda device="cuda": torch.get_rng_state()
    c.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    c.manual_seed = lambda seed: torch.manual_seed(seed)
    c.Stream = _NullStream
    c.Event = _NullEvent
    c.current_stream = lambda device=None: _NullStream()
    c.default_stream = lambda device=None: _NullStream()
    c.stream = lambda s=None: contextlib.nullcontext()
    c.set_device = lambda device: None
    c.empty_cache = lambda: None
    c.memory_allocated = lambda device=None: 0
    c.max_memory_allocated = lambda device=None: 0
    c.memory_reserved = lambda device=None: 0
    c.reset_peak_memory_stats = lambda device=None: None


def _install_rng_tracker() -> None:
    # The TP RNG tracker saves/restores "CUDA" generator states; the CPU generator plays that
    # role, so dropout inside tensor-parallel regions is still reproducible per TP rank.
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    )
    tp_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    )


def _install_causal_mask() -> None:
    # The local attention builds its default causal mask on CUDA; callers on CPU pass an
    # explicit mask (see gad_megatron.models.masks), but guard the helper too.
    from megatron.core.transformer import utils as tutils

    if hasattr(tutils, "get_default_causal_mask"):
        @functools.lru_cache(maxsize=8)
        def get_default_causal_mask(sq: int) -> torch.Tensor:
            return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

        tutils.get_default_causal_mask = get_default_causal_mask


PATCHES: tuple[Patch, ...] = (
    Patch("megatron.*: torch.<factories>(device=cuda)",
          "Megatron allocates with device=current_device()/'cuda'",
          _install_factories),
    Patch("torch.Tensor.to/.cuda, Module.cuda", "Megatron moves tensors and modules with .cuda()",
          _install_tensor_moves),
    Patch("torch.Tensor.type()", "optimizer and grad-clip checks assert 'torch.cuda.*Tensor'",
          _install_tensor_type),
    Patch("torch.cuda.*", "current_device, RNG, streams and events are called unconditionally",
          _install_torch_cuda),
    Patch("tensor_parallel.random._get/_set_cuda_rng_state", "TP RNG tracker forks CUDA RNG",
          _install_rng_tracker),
    Patch("transformer.utils.get_default_causal_mask", "default causal mask is built on CUDA",
          _install_causal_mask),
)


def _check_version() -> str:
    from importlib.metadata import version

    found = version("megatron-core")
    if found not in SUPPORTED_MEGATRON:
        raise UnsupportedMegatronVersion(
            f"megatron_patches supports megatron-core {', '.join(SUPPORTED_MEGATRON)}; "
            f"found {found}. Install a supported version or run on CUDA without the patches."
        )
    return found


def needed() -> bool:
    """True when this process has no usable CUDA (or GAD_FORCE_CPU_PATCHES=1)."""
    return os.environ.get("GAD_FORCE_CPU_PATCHES") == "1" or not torch.cuda.is_available()


def apply(force: bool = False) -> list[str]:
    """Install the CPU redirects once per process; return the active patch targets.

    Does nothing when CUDA is available unless `force`. Refuses megatron-core versions the
    patches were not written for.
    """
    if _applied:
        return list(_applied)
    if not (force or needed()):
        return []
    _check_version()
    # Expected on CPU: TE/apex absence is the point of running here, not news.
    for text in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated", "When using async grad allreduce"):
        warnings.filterwarnings("ignore", message=text)
    for patch in PATCHES:
        patch.install()
        _applied.append(patch.target)
    return list(_applied)


def applied() -> list[str]:
    """Targets of the patches active in this process (empty on GPU runs)."""
    return list(_applied)
