"""What every Megatron worker rank does the same way: rendezvous, build, load, place.

Workers are plain classes; these helpers are composed into them, never inherited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gad_megatron.config.schema import ParallelConfig
from gad_megatron.models.hf_config import HFArch, parse_hf_config


@dataclass(frozen=True)
class WeightsSource:
    """Where a worker's initial weights come from."""

    path: str
    """An HF model directory, or a checkpoint directory written by this project."""
    arch_config: dict
    """The HF config.json of the architecture."""
    dtype: str = "float32"
    backbone_only: bool = False
    """A project checkpoint of which only the backbone is loaded (a student's weights under
    a discriminator's fresh head): `load_into`'s skip prefixes then apply to it as they
    always do to HF directories. False: a project checkpoint loads whole."""

    @property
    def is_megatron(self) -> bool:
        return (Path(self.path) / "gad_checkpoint.json").is_file()

    def arch(self) -> HFArch:
        return parse_hf_config(self.arch_config)

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def start_rank(parallel: ParallelConfig, seed: int) -> None:
    """Join this role's process group and set Megatron's parallel state."""
    from gad_megatron.parallel.dist import device, init_distributed

    if device().type == "cpu":
        # Several ranks share few cores: one thread each avoids oversubscription stalls.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_distributed(parallel, seed=seed)


def load_into(model, source: WeightsSource, skip: tuple[str, ...] = ()) -> None:
    """Load HF weights or a project checkpoint into this rank's shard."""
    if source.is_megatron:
        from gad_megatron.checkpoint.megatron_ckpt import load_model_checkpoint

        load_model_checkpoint(model, source.path, skip=skip if source.backbone_only else ())
    else:
        from gad_megatron.checkpoint.hf_io import load_hf_weights

        load_hf_weights(model, source.arch(), source.path, skip=skip)


def to_device(model):
    from gad_megatron.parallel.dist import device

    return model.to(device()) if device().type == "cuda" else model


def is_output_rank() -> bool:
    """The rank whose results the controller collects: last pipeline stage, TP rank 0."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def pipeline_parallel() -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() > 1


class NonFiniteError(RuntimeError):
    """A number the run depends on is NaN or inf (weights, losses, scores, probabilities)."""


def check_finite_weights(model, role: str) -> None:
    """Collective: raise on every rank when any rank's shard holds a NaN or inf weight, so a
    diverged model is never written as a checkpoint (or exported) that looks usable."""
    from gad_megatron.models.optim import all_ranks_any

    bad = next((name for name, p in model.named_parameters()
                if not bool(torch.isfinite(p.detach()).all())), None)
    if all_ranks_any(bad is not None):
        where = f" (first: {bad})" if bad else " (on another rank)"
        raise NonFiniteError(f"{role}: weights hold NaN/inf{where}; not saving them, the "
                             "previous checkpoint stays the latest")


def pid() -> int:
    """This worker's process id (tests kill workers by pid)."""
    return os.getpid()


class Residency:
    """A role's device memory, given back between its calls in colocated runs
    (models/offload.py). Two parts: the weights (all a forward pass or an export reads) and
    the training state (gradients, Adam). `reload(weights_only=True)` brings back the
    weights alone, for a weight sync; a later full reload brings the rest. Every call is a
    no-op for a part already where it is asked to be."""

    def __init__(self):
        self.weights = self.state = None

    @property
    def offloaded(self) -> bool:
        return self.weights is not None or self.state is not None

    def offload(self, model, optimizer=None) -> int:
        """Free the device memory of `model` (and `optimizer`); returns the bytes moved."""
        from gad_megatron.models.offload import offload, state_tensors, weight_tensors

        if self.weights is None:
            self.weights = offload(weight_tensors(model))
        if self.state is None and optimizer is not None:
            # A storage shared with the weights (fp32 Adam updates the parameters in place)
            # is empty by now, and offload skips empty storages: it moves once, with them.
            self.state = offload(state_tensors(model, optimizer))
        return self.weights.nbytes + (self.state.nbytes if self.state else 0)

    def reload(self, weights_only: bool = False) -> None:
        from gad_megatron.models.offload import reload

        if self.weights is not None:
            reload(self.weights)
            self.weights = None
        if self.state is not None and not weights_only:
            reload(self.state)
            self.state = None
