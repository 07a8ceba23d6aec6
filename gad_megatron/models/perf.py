"""Memory and speed settings of one Megatron role (the `perf` section of each role's config),
and the decisions made from them: pure functions, table-tested in tests/test_perf_config.py.

What a 7B/14B run needs (issue 14, defects 10 and 12):
- Transformer Engine's layer spec on GPUs. Without TE the builder would fall back to the local
  spec, whose unfused attention materialises [B, heads/tp, T, T] scores and runs out of
  memory at the paper's 3.5K tokens; on CUDA that fallback is refused unless asked for.
- sequence parallel (activations of norms/dropout split over TP), activation recompute,
  overlapped gradient reduction, and the RoPE and gradient-accumulation fusions (TE kernels;
  on by default where TE is present). Not offered: the overlapped parameter all-gather
  (see `ddp_kwargs`) and context parallel above 1 (refused, see the field).
"""

from __future__ import annotations

from dataclasses import dataclass

RECOMPUTE = ("none", "selective", "full")


class LocalSpecRefused(RuntimeError):
    """CUDA without Transformer Engine, and the local spec was not asked for."""


@dataclass(frozen=True)
class PerfConfig:
    """Memory/speed settings of one role; defaults are safe everywhere (CPU included)."""

    sequence_parallel: bool = False
    """Split the sequence dimension of norm/dropout activations over TP ranks (needs tp > 1,
    ignored at tp == 1, and TE's layer spec: the local spec refuses it). Saves activation
    memory; the TP all-reduces become reduce-scatter + all-gather of the same volume."""
    recompute: str = "none"
    """Activation recompute: 'none', 'selective' (core attention only: cheap, large saving at
    long sequences) or 'full' (whole layers, `recompute_num_layers` per checkpoint)."""
    recompute_num_layers: int = 1
    """With recompute='full': layers per recomputed chunk (Megatron's uniform method)."""
    context_parallel: int = 1
    """Context-parallel size. Only 1 is supported yet: CP also splits each role's ranks and
    its micro-batches, which the placement and batching code do not do; refused above 1."""
    overlap_grad_reduce: bool = False
    """Overlap DP gradient reduction with the backward of the last micro-batch."""
    rope_fusion: bool | None = None
    """Fused RoPE kernel; None: on where Transformer Engine is present (CUDA)."""
    grad_accumulation_fusion: bool | None = None
    """Fuse the weight-gradient GEMM with its fp32 accumulation; None: on where TE is present."""
    packing: bool = True
    """Pack each micro-batch's sequences end to end (THD, Megatron's `PackedSeqParams`): no
    padding token enters the model and the token budget counts real tokens. False: right-pad
    each micro-batch to its longest sequence (the results agree to fp32 rounding;
    tests/test_packing.py)."""
    allow_local_spec: bool = False
    """On CUDA without Transformer Engine, build with the local (unfused) spec anyway instead
    of refusing (small models, debugging: its attention needs [B, heads/tp, T, T] memory)."""

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"perf.recompute must be one of {list(RECOMPUTE)}, "
                             f"got {self.recompute!r}")
        if self.recompute_num_layers < 1:
            raise ValueError("perf.recompute_num_layers must be >= 1")
        if self.context_parallel != 1:
            raise ValueError(f"perf.context_parallel={self.context_parallel}: only 1 is "
                             f"supported (placement and batching do not split for CP yet)")


def use_te_spec(cuda: bool, te: bool, use_te: bool | None, allow_local_spec: bool) -> bool:
    """Whether to build with TE's layer spec; refuses CUDA without TE unless allowed."""
    if use_te is not None:
        if use_te and not te:
            raise LocalSpecRefused("use_te=True but transformer_engine is not importable")
        return use_te
    if te and cuda:
        return True
    if cuda and not allow_local_spec:
        raise LocalSpecRefused(
            "CUDA is present but transformer_engine is not: the local layer spec's unfused "
            "attention builds [B, heads/tp, T, T] scores (out of memory at the paper's 3.5K "
            "tokens). Install transformer-engine (the CUDA image's), or set "
            "<role>.perf.allow_local_spec=true to run the local spec anyway.")
    return False


def transformer_kwargs(perf: PerfConfig, tp: int, cuda: bool, te_spec: bool) -> dict:
    """TransformerConfig fields decided by `perf` for a role at tensor-parallel size `tp`
    (`te_spec`: the model is built with TE's layer spec)."""
    fused = cuda and te_spec
    if perf.sequence_parallel and tp > 1 and not te_spec:
        # Megatron's local spec norms (torch LayerNorm/RMSNorm wrappers) assert against it.
        raise ValueError("perf.sequence_parallel needs Transformer Engine's layer spec; the "
                         "local spec does not support it")
    kwargs = {
        "sequence_parallel": perf.sequence_parallel and tp > 1,
        "apply_rope_fusion": fused if perf.rope_fusion is None else perf.rope_fusion,
        "gradient_accumulation_fusion": (fused if perf.grad_accumulation_fusion is None
                                         else perf.grad_accumulation_fusion),
    }
    if perf.recompute == "selective":
        kwargs["recompute_granularity"] = "selective"
    elif perf.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=perf.recompute_num_layers)
    return kwargs


def pack_align(perf: PerfConfig, tp: int) -> int:
    """What a packed micro-batch's length must divide by: the TP size under sequence
    parallelism (the sequence is split over TP ranks), else 1."""
    return tp if perf.sequence_parallel and tp > 1 else 1


def ddp_kwargs(perf: PerfConfig) -> dict:
    """DistributedDataParallelConfig fields decided by `perf`.

    The distributed optimizer's overlapped parameter all-gather is deliberately not offered:
    it defers the gather of the updated shards into the next forward's pre-hooks, but every
    step here is followed by a weight export (the sync to the rollout engine) and maybe a
    checkpoint, which read the parameters first. Measured on CPU at DP=2: the exported
    weights then differ from the single-rank run by 9e-3 after three steps.
    """
    return {"overlap_grad_reduce": perf.overlap_grad_reduce}
