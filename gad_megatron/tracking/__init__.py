"""Experiment tracking (MLflow from the driver, spooled when the store is unreachable) and the
training-health watch. See docs/tracking.md."""

from gad_megatron.tracking.config import TrackingConfig
from gad_megatron.tracking.health import HealthWatch
from gad_megatron.tracking.tracker import Tracker, find_run_id, replay_spool

__all__ = ["HealthWatch", "Tracker", "TrackingConfig", "find_run_id", "replay_spool"]
