"""What the controller reports per step: MLflow metrics, health warnings, sample tables."""

from __future__ import annotations

from pathlib import Path

from gad_megatron.config import GADConfig, to_dict


def _text(tokenizer, ids) -> str:
    return tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)


def sample_rows(pairs, tokenizer, limit: int = 8) -> list[dict]:
    """(prompt, teacher, student, scores) rows of the step's first samples."""
    teacher, samples, t_scores, s_scores = pairs
    rows = []
    for i in range(min(limit, len(samples))):
        g = samples.group[i]
        rows.append({"prompt": _text(tokenizer, samples.prompts[i]),
                     "teacher": _text(tokenizer, teacher.responses[g]),
                     "student": _text(tokenizer, samples.responses[i]),
                     "teacher_score": float(t_scores[g]), "student_score": float(s_scores[i])})
    return rows


class RunObserver:
    """Tracking (MLflow when enabled) and the health watch for one stage, in the driver."""

    def __init__(self, cfg: GADConfig, run_dir: Path, tokenizer, resuming: bool,
                 previous_config: dict | None = None):
        from gad_megatron.tracking.tracker import Tracker, find_run_id

        self.tokenizer = tokenizer
        # The run this stage starts from (gad's warmup, a continued seqkd's) is its parent.
        parent = find_run_id(cfg.train.init_from) if cfg.train.init_from else None
        self.tracker = Tracker(cfg.tracking, run_dir, cfg.train.stage.value, to_dict(cfg),
                               parent_run_id=parent, resume=resuming,
                               previous_params=previous_config)
        self.tracker.log_artifact(run_dir / "config.json")

    def on_step(self, step: int, metrics: dict, ctx) -> None:
        for warning in self.tracker.log_metrics(step, metrics):  # also tags health.<name>
            print(f"health warning: {warning}", flush=True)
        if self.tracker.samples_due(step) and getattr(ctx, "last_pairs", None) is not None:
            self.tracker.log_samples(step, sample_rows(ctx.last_pairs, self.tokenizer))

    def close(self, ok: bool) -> None:
        self.tracker.finish("FINISHED" if ok else "FAILED")
