"""Megatron training machinery for one role: DDP wrapper, optimizer, LR schedule, one step.

Loss convention: every loss function in this project returns its micro-batch's *share* of the
global-batch loss (it divides by a global normaliser counted over all micro-batches and all
data-parallel ranks). The shares must therefore be *summed*, never averaged:

- `config.calculate_per_token_loss = True` makes Megatron's schedule leave each micro-batch's
  loss undivided (no `/ num_tokens`, no `/ num_microbatches`) and makes DDP reduce gradients
  across data-parallel ranks with a SUM (gradient scaling factor 1, not 1/dp);
- `train_step` hands Megatron `num_tokens = 0` for every micro-batch, so `finalize_model_grads`
  skips its final division by the all-reduced token count (it divides only when the count > 0).

Micro-batch gradients accumulate in DDP's fp32 grad buffers, DP ranks sum them, and the result
is exactly d(global-batch loss)/d(params) -- the gradient a single rank would compute on the
whole batch. tests/test_train_parallel.py checks this at TP=2, PP=2 and DP=2.

On CPU (gloo) this runs Megatron's own DDP, optimizers (incl. the distributed optimizer) and
grad clipping unmodified, through the redirects in `megatron_patches`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    """Adam + LR schedule + grad clipping of one role."""

    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6 for both models)."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate (unused with decay_style='constant')."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay; Megatron exempts biases and norm weights."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 0.2
    """Clip the global grad norm (over all TP/PP/DP shards) to this value (paper: 0.2);
    0 disables clipping."""
    warmup_steps: int = 0
    """Linear warmup from lr 0 over this many steps (step 0 then runs at lr 0, as in Megatron
    and HF schedulers)."""
    decay_steps: int | None = None
    """Steps over which lr decays from `lr` to `min_lr` (counted from step 0, warmup
    included); None = the run's total steps as passed to wrap_for_training."""
    decay_style: str = "constant"
    """LR after warmup: 'constant', or 'linear' / 'cosine' decay to min_lr."""
    use_distributed_optimizer: bool = False
    """Shard the fp32 master weights and Adam state across data-parallel ranks (ZeRO-1,
    Megatron's DistributedOptimizer): grads are reduce-scattered, each rank updates its
    shard, and the new parameters are all-gathered. Works on CPU over gloo as well as on
    GPUs; it gives the same updates as the replicated optimizer (tested at DP=2)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"optim: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, "
                             f"min_lr={self.min_lr}")
        for name in ("clip_grad", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim: {name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise ValueError(f"optim: adam betas must be in [0, 1) and adam_eps > 0, got "
                             f"{self.adam_beta1}, {self.adam_beta2}, {self.adam_eps}")
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"optim: decay_style must be one of {list(DECAY_STYLES)}, "
                             f"got {self.decay_style!r}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            # Megatron's scheduler asserts warmup < decay; say it in config terms instead.
            raise ValueError(f"optim: decay_steps ({self.decay_steps}) must exceed "
                             f"warmup_steps ({self.warmup_steps})")

    def lr_decay_steps(self, total_steps: int) -> int:
        """The decay horizon handed to Megatron's scheduler (always > warmup_steps)."""
        steps = self.decay_steps if self.decay_steps is not None else total_steps
        return max(steps, self.warmup_steps + 1)


def _megatron_optimizer(ddp, cfg: OptimConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = ddp.config
    return get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, params_dtype=config.params_dtype,
        # bf16/fp16 weights get fp32 master copies inside the optimizer.
        bf16=config.params_dtype == torch.bfloat16, fp16=config.params_dtype == torch.float16,
        use_distributed_optimizer=cfg.use_distributed_optimizer), [ddp])


def wrap_for_training(model, cfg: OptimConfig, total_steps: int = 1000, perf=None):
    """(DDP-wrapped model, Megatron optimizer, LR scheduler) for one model shard.

    `model` is this rank's GPTModel (Megatron parallel state initialised); `total_steps` is
    the decay horizon when `cfg.decay_steps` is None; `perf` (models/perf.PerfConfig) sets
    the gradient-reduce overlap. Sets the hooks Megatron's schedules
    read from the model config, as Megatron's own training loop does.
    """
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from gad_megatron.models.perf import PerfConfig, ddp_kwargs

    config = model.config
    config.calculate_per_token_loss = True  # shares are summed; see the module docstring
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer,
            **ddp_kwargs(perf or PerfConfig())),
        module=model)
    optimizer = _megatron_optimizer(ddp, cfg)
    # Without overlap, grads reduce once per step in finalize_model_grads; with
    # overlap_grad_reduce, no_sync holds the reduce back until the last micro-batch.
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss  # 1 in fp32/bf16; the loss scale in fp16
    decay_steps = cfg.lr_decay_steps(total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.warmup_steps else cfg.lr, max_lr=cfg.lr,
        min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=cfg.decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps, wd_incr_style="constant")
    return ddp, optimizer, scheduler


def _sum_metrics(per_micro_batch: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metrics in per_micro_batch:
        for k, v in metrics.items():
            out[k] = out.get(k, 0.0) + float(v.item() if torch.is_tensor(v) else v)
    return out


def all_ranks_any(flag: bool) -> bool:
    """True on every rank of this role's world when `flag` is True on any of them."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    from gad_megatron.parallel.dist import device

    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def grads_finite(ddp) -> bool:
    """Whether this rank's gradient buffers hold only finite values. After the DP reduction a
    non-finite value anywhere in the global gradient shows up in some rank's buffer (as its
    own local gradient or in its reduced shard), so OR-ing this over the world is exact."""
    buffers = list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))
    return all(bool(torch.isfinite(b.grad_data).all()) for b in buffers)


def train_step(ddp, optimizer, scheduler, micro_batches, loss_fn: Callable) -> dict[str, float]:
    """Forward+backward over `micro_batches` (1F1B under PP), then one optimizer step.

    `loss_fn(output, mb) -> (loss share, num_tokens, metrics)`: the loss share is this
    micro-batch's part of the global-batch loss (already divided by the global normaliser);
    the returned num_tokens is replaced by 0 (see the module docstring). Metric values are
    summed over micro-batches, so they too should be shares. Returns those sums (on the last
    pipeline stage; empty elsewhere) plus `grad_norm` (global, before clipping), the `lr`
    this step used, `update_ok` (0 when the step was not applied) and `skipped`.

    A non-finite loss or gradient on any rank skips the update on every rank before the
    optimizer runs: weights, optimizer state and the LR schedule stay as they were, and the
    result says which (`nonfinite_loss`, `nonfinite_grad`). Under fp16 loss scaling inf/nan
    gradients are the scaler's business (it skips and lowers the scale), so only the loss
    is checked there.
    """
    import math

    from gad_megatron.models.forward import run_schedule

    def share_only(output, mb):
        loss, _, metrics = loss_fn(output, mb)
        return loss, torch.zeros((), dtype=torch.int), metrics

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    per_mb = run_schedule(ddp, micro_batches, share_only, forward_only=False)
    metrics = _sum_metrics(per_mb)
    lr = optimizer.param_groups[0]["lr"]
    bad_loss = all_ranks_any(not all(math.isfinite(v) for v in metrics.values()))
    fp16 = ddp.config.params_dtype == torch.float16
    bad_grad = False if fp16 else all_ranks_any(not grads_finite(ddp))
    if bad_loss or bad_grad:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        metrics.update(grad_norm=float("nan"), lr=float(lr), update_ok=0.0, skipped=1.0,
                       nonfinite_loss=float(bad_loss), nonfinite_grad=float(bad_grad))
        return metrics
    update_ok, grad_norm, _ = optimizer.step()
    if grad_norm is None and update_ok:
        # clip_grad == 0 skips the norm inside step(); grads are untouched, so measure here.
        grad_norm = optimizer.get_grad_norm()
    if update_ok:  # as Megatron's loop: a skipped (overflowed) step does not advance the lr
        scheduler.step(increment=1)
    metrics.update(grad_norm=float(grad_norm if grad_norm is not None else float("nan")),
                   lr=float(lr), update_ok=float(bool(update_ok)), skipped=0.0)
    return metrics
