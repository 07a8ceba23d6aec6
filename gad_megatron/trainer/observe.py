"""What the controller reports per step: MLflow metrics, health warnings, sample tables."""

from __future__ import annotations

from pathlib import Path

from gad_megatron.config import GADConfig, flatten, to_dict


def sample_rows(pairs, tokenizer, limit: int = 8) -> list[dict]:
    """(prompt, teacher, student, scores) rows of the step's first samples."""
    teacher, samples, t_scores, s_scores = pairs
    rows = []
    for i in range(min(limit, len(samples))):
        g = samples.group[i]
        rows.append({"prompt": tokenizer.decode(samples.prompts[i], skip_special_tokens=True),
                     "teacher": tokenizer.decode(teacher.responses[g], skip_special_tokens=True),
                     "student": tokenizer.decode(samples.responses[i], skip_special_tokens=True),
                     "teacher_score": float(t_scores[g]), "student_score": float(s_scores[i])})
    return rows


class RunObserver:
    """Tracking and the health watch for one stage; only the driver process makes one."""

    def __init__(self, cfg: GADConfig, run_dir: Path, tokenizer):
        from gad_megatron.tracking import HealthWatch, Tracker, find_run_id

        self.cfg, self.tokenizer = cfg, tokenizer
        self.health = HealthWatch(cfg.tracking.health, clip_checks=cfg.actor.ppo_epochs > 1)
        self.tracker = None
        if cfg.tracking.enabled:
            parent = find_run_id(cfg.train.init_from) if cfg.train.init_from else None
            self.tracker = Tracker(cfg.tracking, run_dir, cfg.train.stage.value,
                                   flatten(to_dict(cfg)), parent_run_id=parent)

    def on_step(self, step: int, metrics: dict, ctx) -> None:
        for name, message in self.health.update(step, metrics):
            print(f"health warning: {message}", flush=True)
            if self.tracker:
                self.tracker.set_tags({f"health.{name}": message})
        if self.tracker is None:
            return
        self.tracker.log_metrics(step, metrics)
        every = self.cfg.tracking.samples_every
        if every and step % every == 0 and getattr(ctx, "last_pairs", None) is not None:
            self.tracker.log_samples(step, sample_rows(ctx.last_pairs, self.tokenizer))

    def close(self, ok: bool) -> None:
        if self.tracker:
            self.tracker.finish("FINISHED" if ok else "FAILED")
