"""MLflow tracking of a run, from the driver only, that never stops training.

One MLflow run per stage. By default the store is a sqlite database shared by the stages of
a job (`<job>/mlflow.db`, the parent of each stage's run directory), so the gad run can name
its warmup run as parent. Any tracking URI works (a server, a database).

When the store cannot be reached, every call is appended to `<run_dir>/mlflow_spool.jsonl`,
one warning is issued, reconnection is tried at most every `retry_s`, and the spool is
replayed once the store answers (or later with `replay_spool`). Nothing is lost.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gad_megatron.tracking.watch import HealthConfig

SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.I)
URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (the `tracking` section)."""

    enabled: bool = True
    """Log to MLflow from the driver."""
    tracking_uri: str = ""
    """'' = sqlite:///<job dir>/mlflow.db (the parent of run.out_dir); or any MLflow URI."""
    experiment: str = "gad-megatron"
    """MLflow experiment name."""
    samples_every: int = 10
    """Steps between logged tables of sample generations (0: never)."""
    retry_s: float = 60.0
    """Least seconds between reconnection attempts while the store is unreachable."""
    health: HealthConfig = field(default_factory=HealthConfig)


def redact(text: str) -> str:
    """Hide the password of `scheme://user:password@host` URIs."""
    return URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them, with secrets removed."""
    out = {}
    for key, value in params.items():
        text = "***" if SECRET_KEY.search(key) and value not in ("", None) else redact(str(value))
        out[key] = text[:MAX_PARAM_CHARS]
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


def find_run_id(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / "mlflow_run_id.txt"
    return path.read_text().strip() if path.is_file() else None


class _Store:
    """The MLflow client calls, replayable from spool records."""

    def __init__(self, uri: str, experiment: str, run_dir: Path):
        from mlflow.tracking import MlflowClient

        if uri.startswith(("http://", "https://")):
            # A dead server must cost seconds, not MLflow's default minutes of retries.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.client = MlflowClient(uri)
        self.experiment, self.run_dir, self.uri = experiment, run_dir, uri
        self.run_id: str | None = None

    def apply(self, rec: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, c = rec["kind"], self.client
        if kind == "start":
            self._start(rec)
        elif kind == "params":
            items = list(rec["data"].items())
            for i in range(0, len(items), 100):  # MLflow's batch limit
                c.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        elif kind == "metrics":
            ts = int(rec["time"] * 1000)
            c.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, rec["step"])
                                              for k, v in rec["data"].items()])
        elif kind == "tags":
            c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in rec["data"].items()])
        elif kind == "artifact":
            c.log_artifact(self.run_id, rec["path"], rec.get("dir"))
        elif kind == "end":
            c.set_terminated(self.run_id, rec["status"])

    def _start(self, rec: dict) -> None:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):  # keep artifacts beside the job, not in cwd
                location = (self.run_dir.resolve().parent / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(self.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=rec["name"], tags=rec["tags"])
        self.run_id = run.info.run_id
        (self.run_dir / "mlflow_run_id.txt").write_text(self.run_id)


class Tracker:
    """Log a stage's params, metrics and artifacts; survive an unreachable store."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, stage: str, params: dict,
                 parent_run_id: str | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = cfg.tracking_uri or default_uri(self.run_dir)
        self.spool = self.run_dir / "mlflow_spool.jsonl"
        self.history: list[dict] = []
        self._offline_since: float | None = None
        self._warned = False
        self.store = _Store(self.uri, cfg.experiment, self.run_dir)
        tags = {"stage": stage, "git_commit": git_commit()}
        if parent_run_id:
            tags.update({"mlflow.parentRunId": parent_run_id, "gad.parent_run_id": parent_run_id})
        self._emit({"kind": "start", "name": stage, "tags": tags})
        self._emit({"kind": "params", "data": safe_params({**params, "git_commit": tags["git_commit"]})})

    @property
    def run_id(self) -> str | None:
        return self.store.run_id

    def _emit(self, rec: dict) -> None:
        if self._offline_since is not None:
            if time.monotonic() - self._offline_since < self.cfg.retry_s or not self._replay():
                self._spool(rec)
                return
        try:
            self.store.apply(rec)
        except Exception as exc:  # noqa: BLE001 - any store failure means: spool and go on
            self._go_offline(exc)
            self._spool(rec)

    def _go_offline(self, exc: Exception) -> None:
        self._offline_since = time.monotonic()
        if not self._warned:
            self._warned = True
            warnings.warn(f"MLflow store {redact(self.uri)} unreachable ({type(exc).__name__}); "
                          f"training goes on, tracking is kept in {self.spool}", stacklevel=3)

    def _spool(self, rec: dict) -> None:
        with self.spool.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def _replay(self) -> bool:
        """Push the spool to the store; True when it is empty afterwards."""
        try:
            pushed = replay_records(self.store, self.spool)
        except Exception:  # noqa: BLE001 - still unreachable: try again after retry_s
            self._offline_since = time.monotonic()
            return False
        self._offline_since = None
        return pushed >= 0

    def log_metrics(self, step: int, metrics: dict) -> None:
        data = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.history.append({"step": step, **data})
        self._emit({"kind": "metrics", "step": step, "time": time.time(), "data": data})

    def set_tags(self, tags: dict) -> None:
        self._emit({"kind": "tags", "data": {k: redact(str(v)) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self._emit({"kind": "artifact", "path": str(path), "dir": artifact_dir})

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """A table of sample generations: appended to samples.jsonl and logged as JSON."""
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        table = self.run_dir / "samples" / f"step_{step:07d}.json"
        table.parent.mkdir(exist_ok=True)
        table.write_text(json.dumps(rows, indent=1))
        self.log_artifact(table, "samples")

    def finish(self, status: str = "FINISHED") -> None:
        from gad_megatron.tracking.curves import write_curve_plots

        for png in write_curve_plots(self.history, self.run_dir / "plots"):
            self.log_artifact(png, "plots")
        if (self.run_dir / "config.json").is_file():
            self.log_artifact(self.run_dir / "config.json")
        self._emit({"kind": "end", "status": status})
        if self.spool.is_file() and self.spool.stat().st_size:
            self._offline_since = None if self._replay() else self._offline_since


def replay_records(store: _Store, spool: Path) -> int:
    """Apply spooled records in order; the spool is emptied only once all went through."""
    if not spool.is_file():
        return 0
    records = [json.loads(line) for line in spool.read_text().splitlines() if line.strip()]
    if store.run_id is None and records and records[0]["kind"] != "start":
        store.run_id = find_run_id(store.run_dir)
    for rec in records:
        store.apply(rec)
    spool.unlink()
    return len(records)


def replay_spool(run_dir: str | Path, tracking_uri: str, experiment: str = "gad-megatron") -> int:
    """Upload what a run kept locally while its store was unreachable; returns the count."""
    run_dir = Path(run_dir)
    store = _Store(tracking_uri, experiment, run_dir)
    return replay_records(store, run_dir / "mlflow_spool.jsonl")
