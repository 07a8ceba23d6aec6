"""The controller: one short loop that orders calls on the roles. No maths, no model code."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from gad_megatron.config import GADConfig, Stage, flatten, to_dict
from gad_megatron.trainer.setup import build_loader, resolve_inputs
from gad_megatron.trainer.steps import STEPS, StepContext


def save_checkpoint(roles, run_dir: Path, step: int, keep_last: int, hf_dir: str) -> Path:
    """Save every role's model under checkpoints/step_N, then move the `latest` pointer."""
    root = run_dir / "checkpoints"
    ckpt = root / f"step_{step:07d}"
    roles.actor.call_all("save", str(ckpt / "actor"), hf_dir)
    if roles.disc is not None:
        roles.disc.call_all("save", str(ckpt / "discriminator"))
    tmp = root / "latest.tmp"
    tmp.write_text(ckpt.name)
    os.replace(tmp, root / "latest")  # the pointer moves only once every part is complete
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def train(cfg: GADConfig, backend: str = "ray",
          on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run `cfg.train.stage` to completion; returns the per-step metrics."""
    from gad_megatron.trainer.backends import start_roles

    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    inputs = resolve_inputs(cfg)
    loader = build_loader(cfg, inputs.tokenizer)
    total = cfg.train.steps or cfg.train.epochs * loader.batches_per_epoch
    roles = start_roles(cfg, inputs, total, backend)
    ctx = StepContext(cfg, roles.actor, roles.rollout, roles.disc, roles.ref,
                      roles.monitor, inputs.pad_id, inputs.eos_id)
    step_fn = STEPS[cfg.train.stage.value]
    history: list[dict] = []
    try:
        if cfg.train.stage != Stage.SEQKD:
            roles.rollout.sync_from(roles.actor)  # the engine starts from the actor's weights
        for step in range(total):
            batch = loader.next_batch()
            ctx.timings = {}
            start = time.perf_counter()
            metrics = step_fn(ctx, batch, step)
            metrics.update(ctx.timings, step=step, **{"time/step": time.perf_counter() - start})
            history.append(metrics)
            if on_step:
                on_step(step, metrics)
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
                save_checkpoint(roles, run_dir, step + 1, cfg.train.keep_last, inputs.hf_dir)
        if not cfg.train.save_every or total % cfg.train.save_every:
            save_checkpoint(roles, run_dir, total, cfg.train.keep_last, inputs.hf_dir)
    finally:
        roles.shutdown()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    return history


__all__ = ["train", "save_checkpoint", "flatten"]
