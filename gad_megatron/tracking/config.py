"""The tracking section of a job's config (GADConfig.tracking)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow logging and training-health warnings of the driver process."""

    enabled: bool = True
    """Log to MLflow. False: no MLflow at all; samples.jsonl, plots and health warnings stay."""
    tracking_uri: str = ""
    """MLflow tracking URI ('http://127.0.0.1:5000', 'sqlite:///x.db', ...). Empty: the job's
    local SQLite store `sqlite:///<run_dir>/../mlflow.db`, shared by its stages (so the gad
    run nests under its warmup run); no server needed."""
    experiment: str = "gad-megatron"
    """MLflow experiment the runs go to (created when missing)."""
    run_name: str = ""
    """MLflow run name. Empty: '<parent dir>/<run dir>' of the run directory."""
    samples_every: int = 10
    """Steps between sample-table artifacts (prompt, teacher, student, D scores); 0: never."""
    plots_every: int = 0
    """Steps between PNG plots of the key curves; 0: plots only when the run finishes."""
    d_acc_low: float = 0.55
    """Health: D accuracy below this for `d_acc_patience` steps means D is not learning."""
    d_acc_high: float = 0.9
    """Health: D accuracy above this for `d_acc_patience` steps means D is over-confident
    and the student gets almost no signal."""
    d_acc_patience: int = 5
    """Consecutive steps a d_acc condition must hold before it is reported."""
    score_gap_max: float = 10.0
    """Health: |teacher - student| mean score gap above this means D's scores saturate."""
    clip_frac_low: float = 0.1
    """Health: policy clip fraction below this (once clipping has acted at all) means the
    clip range is too wide to matter."""
    clip_frac_high: float = 0.3
    """Health: policy clip fraction above this means updates are mostly cut off."""
    length_ratio_max: float = 2.0
    """Health: student/teacher mean response length above this hints at reward hacking."""
    length_ratio_min: float = 0.5
    """Health: student/teacher mean response length below this hints at reward hacking."""
    health_window: int = 20
    """Steps the windowed rules (length_drift, frozen_d_divergence, d_collapse) look back
    over; each stays silent until it has this many steps with its metrics."""
    length_drift_tol: float = 0.25
    """Health: the window's mean student length over mean teacher length outside
    [1 - tol, 1 + tol] is a drift from the teacher's length (smaller and slower than the
    length_ratio_min/max band, which catches a single step's blow-up)."""
    reward_divergence_min: float = 0.1
    """Health: over the window, the live-D reward rising by more than this (second half's
    mean minus first half's) while the frozen-D monitor's reward falls by more than this
    means the student fools the current D rather than getting more teacher-like."""
    d_collapse_tol: float = 0.05
    """Health: the window's mean d_acc within this of 0.5 counts as collapsed to chance."""
    d_collapse_from: float = 0.7
    """Health: d_collapse needs D to have been this accurate before (a window mean), so a D
    that never learned is left to d_acc_low."""
    d_loss_flat_tol: float = 0.02
    """Health: d_loss spread (max - min over the window) at most this counts as flat: a D at
    chance whose loss no longer moves has stopped learning, not reached a balance."""
    retry_s: float = 60.0
    """Least seconds between two reconnect attempts while the tracking server is down."""
    http_timeout_s: int = 5
    """Per-request timeout of MLflow's HTTP client, so a dead server costs seconds."""
    http_max_retries: int = 1
    """MLflow HTTP retries per request (no backoff sleep between them)."""

    def __post_init__(self) -> None:
        if self.samples_every < 0 or self.plots_every < 0 or self.d_acc_patience < 1:
            raise ValueError("samples_every, plots_every >= 0 and d_acc_patience >= 1 required")
        if not 0 <= self.d_acc_low <= self.d_acc_high <= 1:
            raise ValueError("0 <= d_acc_low <= d_acc_high <= 1 required")
        if self.clip_frac_low > self.clip_frac_high or self.length_ratio_min > self.length_ratio_max:
            raise ValueError("clip_frac_low <= clip_frac_high and "
                             "length_ratio_min <= length_ratio_max required")
        if self.health_window < 2 or self.length_drift_tol <= 0 or self.d_collapse_tol <= 0:
            raise ValueError("health_window >= 2, length_drift_tol > 0 and d_collapse_tol > 0 "
                             "required")
        if self.reward_divergence_min < 0 or self.d_loss_flat_tol < 0:
            raise ValueError("reward_divergence_min >= 0 and d_loss_flat_tol >= 0 required")
        if self.retry_s < 0 or self.http_timeout_s < 1 or self.http_max_retries < 0:
            raise ValueError("retry_s >= 0, http_timeout_s >= 1 and http_max_retries >= 0 required")
        if not self.experiment:
            raise ValueError("experiment must not be empty")
