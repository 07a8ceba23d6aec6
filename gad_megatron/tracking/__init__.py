"""Experiment tracking (MLflow) and the health watch."""

from gad_megatron.tracking.mlflow_tracker import (
    Tracker, TrackingConfig, find_run_id, redact, replay_spool, safe_params)
from gad_megatron.tracking.watch import HealthConfig, HealthWatch

__all__ = ["HealthConfig", "HealthWatch", "Tracker", "TrackingConfig", "find_run_id", "redact",
           "replay_spool", "safe_params"]
