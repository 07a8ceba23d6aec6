"""Experiment tracking (MLflow) and the health watch."""

from gad_megatron.tracking.health import HealthConfig, HealthWatch
from gad_megatron.tracking.mlflow_tracker import (
    Tracker, TrackingConfig, find_run_id, redact, replay_spool, safe_params)

__all__ = ["HealthConfig", "HealthWatch", "Tracker", "TrackingConfig", "find_run_id", "redact",
           "replay_spool", "safe_params"]
