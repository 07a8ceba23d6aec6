"""The controller: one short loop that orders calls on the roles. No maths, no model code."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from gad_megatron.config import GADConfig, Stage, to_dict
from gad_megatron.trainer.setup import build_loader, resolve_inputs
from gad_megatron.trainer.steps import STEPS, StepContext, add_throughput

STATE_FILE = "trainer_state.json"


def save_checkpoint(roles, run_dir: Path, step: int, keep_last: int, hf_dir: str,
                    loader_state: dict) -> Path:
    """Every role's full training state under checkpoints/step_N, then the trainer state,
    then the `latest` pointer: a crash at any point leaves the previous checkpoint current."""
    root = run_dir / "checkpoints"
    ckpt = root / f"step_{step:07d}"
    shutil.rmtree(ckpt, ignore_errors=True)  # a partial leftover of a crashed save
    roles.actor.call_all("save", str(ckpt / "actor"), hf_dir)
    if roles.disc is not None:
        roles.disc.call_all("save", str(ckpt / "discriminator"))
    _write_atomic(ckpt / STATE_FILE, json.dumps({"step": step, "loader": loader_state}))
    _write_atomic(root / "latest", ckpt.name)
    older = sorted(p for p in root.glob("step_*") if p.is_dir() and p != ckpt)
    for old in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resume_point(run_dir: Path) -> Path | None:
    """The checkpoint the `latest` pointer names, if it is complete."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    ckpt = run_dir / "checkpoints" / pointer.read_text().strip()
    return ckpt if (ckpt / STATE_FILE).is_file() else None


def _restore(roles, ckpt: Path, loader) -> int:
    state = json.loads((ckpt / STATE_FILE).read_text())
    roles.actor.call_all("load", str(ckpt / "actor"))
    if roles.disc is not None:
        roles.disc.call_all("load", str(ckpt / "discriminator"))
    loader.load_state_dict(state["loader"])
    return int(state["step"])


def _metrics_log(run_dir: Path, start: int):
    """Append-only metrics file; on resume, drop entries of steps that will be redone."""
    path = run_dir / "metrics.jsonl"
    kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
            if json.loads(line)["step"] < start]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def train(cfg: GADConfig, backend: str = "ray",
          on_step: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None) -> list[dict]:
    """Run `cfg.train.stage` (resuming when a checkpoint exists); returns this call's metrics.

    `stop_after` ends the call after that many steps, as a crash would (tests of resume)."""
    from gad_megatron.trainer.backends import start_roles

    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    inputs = resolve_inputs(cfg)
    loader = build_loader(cfg, inputs.tokenizer)
    total = cfg.train.steps or cfg.train.epochs * loader.batches_per_epoch
    from gad_megatron.trainer.observe import RunObserver

    observer = RunObserver(cfg, run_dir, inputs.tokenizer,
                           resuming=cfg.train.resume and resume_point(run_dir) is not None)
    roles = start_roles(cfg, inputs, total, backend)
    ctx = StepContext(cfg, roles.actor, roles.rollout, roles.disc, roles.ref,
                      roles.monitor, inputs.pad_id, inputs.eos_id)
    step_fn, history, ok = STEPS[cfg.train.stage.value], [], False
    try:
        ckpt = resume_point(run_dir) if cfg.train.resume else None
        start = _restore(roles, ckpt, loader) if ckpt else 0
        if cfg.train.stage != Stage.SEQKD:
            roles.rollout.sync_from(roles.actor)  # the engine starts from the actor's weights
        log = _metrics_log(run_dir, start)
        for step in range(start, total):
            if stop_after is not None and step - start >= stop_after:
                break
            batch = loader.next_batch()
            ctx.timings, t0 = {}, time.perf_counter()
            metrics = step_fn(ctx, batch, step)
            metrics.update(ctx.timings, step=step, **{"time/step": time.perf_counter() - t0})
            add_throughput(metrics)
            history.append(metrics)
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            observer.on_step(step, metrics, ctx)
            if on_step:
                on_step(step, metrics)
            done = step + 1
            if done == total or (cfg.train.save_every and done % cfg.train.save_every == 0):
                save_checkpoint(roles, run_dir, done, cfg.train.keep_last, inputs.hf_dir,
                                loader.state_dict())
        log.close()
        ok = True
    finally:
        roles.shutdown()
        observer.close(ok)
    return history
