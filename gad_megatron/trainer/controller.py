"""The controller: one short loop that orders calls on the roles. No maths, no model code."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from gad_megatron.config import GADConfig, Stage, to_dict
from gad_megatron.config.loader import read_run_config
from gad_megatron.data.batching import Lookahead
from gad_megatron.trainer.checkpoints import (
    check_fresh_start, find_resume, restore, save_checkpoint, write_atomic)
from gad_megatron.trainer.run_lock import hold_run_dir
from gad_megatron.trainer.safety import SkipGuard, StopSignals
from gad_megatron.trainer.setup import build_loader, resolve_inputs, step_aids
from gad_megatron.trainer.steps import STEPS, StepContext, add_throughput


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash mid-write


def _metrics_log(run_dir: Path, start: int):
    """Append-only metrics file; on resume, drop entries of steps that will be redone."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if (step := _logged_step(line)) is not None and step < start]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _checkpoint_to_resume(cfg: GADConfig, run_dir: Path) -> Path | None:
    """Decided before anything is written or started: resume, start fresh, or refuse."""
    if cfg.train.resume:
        return find_resume(run_dir, fallback=cfg.train.resume_fallback)
    check_fresh_start(run_dir, cfg.train.overwrite)
    return None


def _refuse_incompatible(cfg: GADConfig, ckpt: Path | None, previous: dict | None) -> None:
    """A resume or a train.init_from whose weights are not the model the config asks for is
    refused here, before anything of the run is written (trainer/compat.py)."""
    from gad_megatron.trainer import compat
    from gad_megatron.trainer.setup import latest_checkpoint, requested_hf_config

    if ckpt is not None:
        compat.check_resume(cfg, ckpt, previous, requested_hf_config(cfg))
    elif cfg.train.init_from and Path(cfg.train.init_from).exists():
        compat.check_init_from(cfg, latest_checkpoint(cfg.train.init_from),
                               requested_hf_config(cfg))


def train(cfg: GADConfig, backend: str = "ray",
          on_step: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None) -> list[dict]:
    """Run `cfg.train.stage` (resuming when a checkpoint exists); returns this call's metrics.

    SIGTERM/SIGUSR1 end the call after the current step with a checkpoint. `stop_after`
    ends it after that many steps, as a crash would (tests of resume)."""
    run_dir = Path(cfg.run.out_dir)
    with hold_run_dir(run_dir):  # one driver per run directory, before any write
        return _train_held(cfg, run_dir, backend, on_step, stop_after)


def _train_held(cfg: GADConfig, run_dir: Path, backend: str, on_step, stop_after) -> list[dict]:
    """`train` once this process holds `run_dir`."""
    from gad_megatron.trainer.backends import start_roles
    from gad_megatron.trainer.observe import RunObserver

    ckpt = _checkpoint_to_resume(cfg, run_dir)
    previous = read_run_config(run_dir) if ckpt is not None else None
    _refuse_incompatible(cfg, ckpt, previous)
    write_atomic(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
    inputs = resolve_inputs(cfg)
    loader = Lookahead(build_loader(cfg, inputs.tokenizer, run_dir))
    total = cfg.train.steps or cfg.train.epochs * loader.batches_per_epoch
    observer = RunObserver(cfg, run_dir, inputs.tokenizer, resuming=ckpt is not None,
                           previous_config=previous)
    roles = start_roles(cfg, inputs, total, backend)
    ctx = StepContext(cfg, roles.actor, roles.rollout, roles.disc, roles.ref,
                      roles.monitor, inputs.pad_id, inputs.eos_id,
                      **step_aids(cfg, inputs, loader.loader.dataset))
    loop = _Loop(cfg, run_dir, roles, ctx, loader, inputs.hf_dir, observer, on_step)
    ok = False
    try:
        with StopSignals() as signals:
            loop.run(ckpt, total, signals, stop_after)
        ok = True
    except KeyboardInterrupt:
        saved = "none" if loop.saved is None else loop.saved
        print(f"interrupted at step {loop.step}; last checkpoint step {saved}", flush=True)
        raise
    finally:
        roles.shutdown()
        observer.close(ok)
    return loop.history


class _Loop:
    """The step loop of one `train` call, with what it has done so far (for messages)."""

    def __init__(self, cfg, run_dir, roles, ctx, loader, hf_dir, observer, on_step):
        self.cfg, self.run_dir, self.roles, self.ctx = cfg, run_dir, roles, ctx
        self.loader, self.hf_dir, self.observer, self.on_step = loader, hf_dir, observer, on_step
        self.history: list[dict] = []
        self.step, self.saved = 0, None

    def run(self, ckpt: Path | None, total: int, signals: StopSignals,
            stop_after: int | None) -> None:
        cfg, roles, ctx = self.cfg, self.roles, self.ctx
        guard = SkipGuard(cfg.train.max_skipped_steps)
        start = 0
        if ckpt is not None:
            state = restore(roles, ckpt, self.loader)
            start = int(state["step"])
            guard = SkipGuard(cfg.train.max_skipped_steps, state.get("skipped"))
            self.saved = start
            print(f"resuming from step {start} (checkpoint {ckpt})", flush=True)
        if cfg.train.stage != Stage.SEQKD:
            roles.rollout.sync_from(roles.actor)  # the engine starts from the actor's weights
        step_fn = STEPS[cfg.train.stage.value]
        with _metrics_log(self.run_dir, start) as log:
            for step in range(start, total):
                signals.check_interrupt()
                if stop_after is not None and step - start >= stop_after:
                    break
                self.step = step
                batch = self.loader.next_batch()
                # One-step off-policy sampling starts on the next batch during this step.
                ctx.upcoming = self.loader.peek if step + 1 < total else None
                ctx.timings, t0 = {}, time.perf_counter()
                metrics = step_fn(ctx, batch, step)
                metrics.update(ctx.timings, step=step, **{"time/step": time.perf_counter() - t0})
                add_throughput(metrics)
                try:
                    guard.check(step, metrics)
                finally:  # the failing step's numbers are part of the record too
                    self._record(log, step, metrics)
                done = step + 1
                stopping = signals.received is not None
                if done == total or stopping or (cfg.train.save_every
                                                 and done % cfg.train.save_every == 0):
                    self._save(done, guard, signals)
                if stopping:
                    print(f"stopped by {signals.received} at step {done}; checkpoint step "
                          f"{done} saved in {self.run_dir / 'checkpoints'}", flush=True)
                    break

    def _record(self, log, step: int, metrics: dict) -> None:
        self.history.append(metrics)
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        self.observer.on_step(step, metrics, self.ctx)
        if self.on_step:
            self.on_step(step, metrics)

    def _save(self, done: int, guard: SkipGuard, signals: StopSignals) -> None:
        state = {"loader": self.loader.state_dict(), "skipped": guard.state_dict()}
        try:
            save_checkpoint(self.roles, self.run_dir, done, self.cfg.train.keep_last,
                            self.hf_dir, state)
        except BaseException:
            signals.check_interrupt()  # Ctrl-C inside the save, wrapped by dist_checkpointing
            raise
        self.saved = done
