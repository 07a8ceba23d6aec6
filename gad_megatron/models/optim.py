"""Megatron training machinery for one role: DDP wrapper, optimizer, LR schedule, one step.

Loss convention: every loss function in this project returns its micro-batch's *share* of the
global-batch loss (it divides by a global normaliser counted over all micro-batches and all
data-parallel ranks). The shares must therefore be *summed*, never averaged:

- `config.calculate_per_token_loss = True` makes Megatron's schedule leave each micro-batch's
  loss undivided and makes DDP reduce gradients across data-parallel ranks with a SUM
  (gradient scaling factor 1);
- the loss functions report `num_tokens = 0`, so `finalize_model_grads` does not divide the
  gradients by a token count either (its division is skipped when the count is 0).

The gradient is then exactly d(global-batch loss)/d(params); tests/test_train_parallel.py
checks this against single-rank runs.
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
    """Floor of the decayed learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 0.2
    """Global grad-norm clip (paper: 0.2); 0 disables clipping."""
    warmup_steps: int = 0
    """Linear LR warmup steps."""
    decay_style: str = "constant"
    """LR after warmup: constant, linear or cosine decay to min_lr over the run."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (ZeRO-1, Megatron's distributed
    optimizer)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, "
                             f"min_lr={self.min_lr}")
        if self.clip_grad < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("clip_grad, weight_decay and warmup_steps must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise ValueError("adam betas must be in [0, 1) and adam_eps > 0")
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"decay_style must be one of {list(DECAY_STYLES)}, "
                             f"got {self.decay_style!r}")


def wrap_for_training(model, cfg: OptimConfig, total_steps: int = 1000):
    """(DDP-wrapped model, Megatron optimizer, LR scheduler) for one model shard."""
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model.config
    config.calculate_per_token_loss = True  # shares are summed; see the module docstring
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer),
        module=model)
    bf16 = config.params_dtype == torch.bfloat16
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    decay_steps = max(total_steps, cfg.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if cfg.warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=cfg.decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps, wd_incr_style="constant")
    return ddp, optimizer, scheduler


def _sum_metrics(per_micro_batch: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metrics in per_micro_batch:
        for k, v in metrics.items():
            out[k] = out.get(k, 0.0) + float(v.item() if torch.is_tensor(v) else v)
    return out


def train_step(ddp, optimizer, scheduler, micro_batches, loss_fn: Callable) -> dict[str, float]:
    """Forward+backward over `micro_batches` (1F1B under PP), then one optimizer step.

    `loss_fn(output, mb) -> (loss share, num_tokens, metrics)`; the returned num_tokens is
    replaced by 0 (see the module docstring). Returns summed metric shares (on the last
    pipeline stage; empty elsewhere), plus the pre-clip `grad_norm` and the `lr` used.
    """
    from gad_megatron.models.forward import run_schedule

    def share_only(output, mb):
        loss, _, metrics = loss_fn(output, mb)
        return loss, torch.zeros((), dtype=torch.int), metrics

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    per_mb = run_schedule(ddp, micro_batches, share_only, forward_only=False)
    lr = optimizer.param_groups[0]["lr"]
    update_ok, grad_norm, num_zeros = optimizer.step()
    scheduler.step(increment=1)
    metrics = _sum_metrics(per_mb)
    metrics.update(grad_norm=float(grad_norm if grad_norm is not None else 0.0), lr=float(lr),
                   update_ok=float(bool(update_ok)))
    return metrics
