"""Experiment tracking (MLflow) and the health watch.

The names below are the ones the trainer is wired to today (mlflow_tracker.py, watch.py).
The spooling tracker with the flat TrackingConfig lives in tracker.py / config.py /
health.py (see docs/tracking.md); import it from those modules.
"""

from gad_megatron.tracking.mlflow_tracker import (
    Tracker, TrackingConfig, find_run_id, redact, replay_spool, safe_params)
from gad_megatron.tracking.watch import HealthConfig, HealthWatch

__all__ = ["HealthConfig", "HealthWatch", "Tracker", "TrackingConfig", "find_run_id", "redact",
           "replay_spool", "safe_params"]
