"""Attach an evaluation report to the MLflow run of the stage it evaluates.

Training wrote that run's id to `RUN/mlflow_run_id.txt` and its tracking settings to
`RUN/config.json`. The report's numbers go in as `eval/...` metrics at the evaluated
checkpoint's step, and the JSON and Markdown files under the run's `eval/` artifacts. The
report always stays on disk first: if tracking is off, the run was never tracked or the store
does not answer, a warning says so and nothing else changes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def eval_metrics(result: dict, prefix: str = "eval") -> dict[str, float]:
    """The numeric leaves of `result["metrics"]`, keyed `eval/<path>` (lists are left out:
    per-prompt values belong in the report file, not in metric series)."""
    out: dict[str, float] = {}

    def walk(node, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}/{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[key] = float(node)

    walk(result.get("metrics", {}), prefix)
    out[f"{prefix}/n"] = float(result.get("n", 0))
    return out


def log_report_to_run(run_dir: str | Path, result: dict, files: list[Path], step: int,
                      artifact_path: str = "eval") -> str | None:
    """Log `result`'s metrics and `files` (under `artifact_path`) to the run's MLflow run;
    returns its id, or None when nothing was logged (the reason is logged as a warning)."""
    from gad_megatron.config.loader import build, read_run_config
    from gad_megatron.tracking.config import TrackingConfig
    from gad_megatron.tracking.redact import redact_uri
    from gad_megatron.tracking.tracker import default_uri, find_run_id

    run_dir = Path(run_dir)
    run_id = find_run_id(run_dir)
    cfg = build(TrackingConfig, read_run_config(run_dir).get("tracking") or {}, "tracking")
    if not cfg.enabled or run_id is None:
        log.warning("eval: %s has no MLflow run (tracking off or never started); the report "
                    "stays in %s only", run_dir, files[0].parent if files else run_dir)
        return None
    uri = cfg.tracking_uri or default_uri(run_dir)
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from gad_megatron.tracking.spool import http_limits

        client = MlflowClient(tracking_uri=uri)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in eval_metrics(result).items()]
        # A dead server costs the training's short timeouts, not MLflow's minutes of retries.
        with http_limits(cfg.http_timeout_s, cfg.http_max_retries):
            for start in range(0, len(metrics), 1000):  # MLflow's batch limit
                client.log_batch(run_id, metrics=metrics[start:start + 1000])
            for path in files:
                client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    except Exception as exc:  # noqa: BLE001 - the store being down must not fail an eval
        log.warning("eval: could not log the report to MLflow run %s at %s (%s); it stays "
                    "in %s", run_id, redact_uri(uri), redact_uri(str(exc)).splitlines()[0],
                    files[0].parent if files else run_dir)
        return None
    return run_id
