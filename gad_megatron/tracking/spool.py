"""MLflow operations as JSON records: applied live, or spooled to disk and replayed later.

Every call the Tracker makes is one record ("op"). While the tracking store answers, a record
is applied at once; while it does not, records are appended to `<run_dir>/mlflow_spool.jsonl`
in order and replayed, in the same order, when it answers again (or by `replay_spool`).
A run is named by a local key until the store gives it an id; `bind` records keep that
mapping in the spool, so a replay cut short resumes without creating the run twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SPOOL_FILE = "mlflow_spool.jsonl"
SPOOL_FILES_DIR = "mlflow_spool_files"
REJECTED_FILE = "mlflow_rejected.jsonl"
RUN_ID_FILE = "mlflow_run_id.txt"
# MLflow's own per-request limits (mlflow.utils.validation).
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000
# Errors the store gives for a request it will never accept: retrying cannot help.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
              "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST", "MALFORMED_REQUEST"}


class Unavailable(Exception):
    """The tracking store did not answer (network, server or database down)."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` means "try again later" rather than "this request is wrong"."""
    from mlflow.exceptions import MlflowException
    import requests

    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT
    return isinstance(exc, (requests.RequestException, OSError, TimeoutError))


def now_ms() -> int:
    return int(time.time() * 1000)


def is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "uc")


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The tag that marks an experiment as model training (MLflow 3's UI otherwise opens an
untagged experiment on its GenAI view: traces and prompts instead of runs and curves)."""


def get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags=dict([EXPERIMENT_KIND]))
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND[0] not in (exp.tags or {}):  # made by an older version, or by hand
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def _run_exists(client, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        client.get_run(run_id)
        return True
    except Exception as exc:  # noqa: BLE001 - an outage propagates, a missing run is False
        if is_transient(exc):
            raise
        return False


def _start(client, op: dict) -> str:
    """Create (or, on resume, reopen) the run of a `start` record; returns its id."""
    from mlflow.entities import RunStatus

    if _run_exists(client, op.get("resume_run_id")):
        client.update_run(op["resume_run_id"], status=RunStatus.to_string(RunStatus.RUNNING))
        return op["resume_run_id"]
    exp_id = get_or_create_experiment(client, op["experiment"], op.get("artifact_location"))
    tags = dict(op.get("tags") or {})
    parent = op.get("parent_run_id")
    if parent and _run_exists(client, parent):  # the UI nests runs of the same store only
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, start_time=op["time"], tags=tags, run_name=op["run_name"])
    return run.info.run_id


def _batch(client, run_id: str, op: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    metrics = [Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in op.get("metrics", [])]
    params = [Param(k, str(v)) for k, v in (op.get("params") or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (op.get("tags") or {}).items()]
    if metrics or params or tags:
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)


def apply(client, op: dict, runs: dict[str, str], run_dir: Path | None = None) -> None:
    """Carry out one record against the store; `runs` maps local run keys to run ids."""
    kind, key = op["op"], op["key"]
    if kind == "bind":
        runs[key] = op["run_id"]
        return
    if kind == "start":
        if key not in runs:
            runs[key] = _start(client, op)
            if run_dir is not None:
                write_run_id(run_dir, runs[key])
        return
    run_id = runs.get(key)
    if run_id is None:
        raise RuntimeError(f"spool record {kind!r} for run key {key} that was never started")
    if kind == "batch":
        _batch(client, run_id, op)
    elif kind == "artifact":
        path = Path(op["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), op.get("artifact_path"))
        elif path.exists():
            client.log_artifact(run_id, str(path), op.get("artifact_path"))
        else:
            log.warning("tracking: artifact %s vanished before upload; skipped", path)
    elif kind == "end":
        client.set_terminated(run_id, op["status"], end_time=op["time"])
    else:
        raise ValueError(f"unknown spool record {kind!r}")


def write_run_id(run_dir: Path, run_id: str) -> None:
    path = Path(run_dir) / RUN_ID_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)


def append(run_dir: Path, op: dict) -> None:
    with (Path(run_dir) / SPOOL_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(op) + "\n")
        f.flush()


def read(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / SPOOL_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a crash mid-write: the rest is intact
            log.warning("tracking: skipped a torn line of %s", path)
    return out


def reject(run_dir: Path, op: dict, exc: BaseException) -> None:
    """Keep a record the store refused, with the reason, rather than dropping it."""
    log.warning("tracking: the store refused a %r record (%s); kept in %s",
                op.get("op"), exc, Path(run_dir) / REJECTED_FILE)
    with (Path(run_dir) / REJECTED_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps({"error": str(exc)[:2000], "record": op}) + "\n")


def _groups(ops: list[dict]) -> Iterator[tuple[int, int, dict]]:
    """(start, end, merged op): consecutive metric-only batches of one run become one request,
    so a long outage replays in a few calls rather than one per step."""
    i = 0
    while i < len(ops):
        op, j = ops[i], i + 1
        if op["op"] == "batch" and not op.get("params") and not op.get("tags"):
            metrics = list(op.get("metrics", []))
            while (j < len(ops) and ops[j]["op"] == "batch" and ops[j]["key"] == op["key"]
                   and not ops[j].get("params") and not ops[j].get("tags")
                   and len(metrics) + len(ops[j].get("metrics", [])) <= MAX_METRICS):
                metrics += ops[j].get("metrics", [])
                j += 1
            op = {"op": "batch", "key": op["key"], "metrics": metrics}
        yield i, j, op
        i = j


def replay(client, run_dir: Path, runs: dict[str, str]) -> int:
    """Apply the spool in order; on an outage keep what is left (plus run-id bindings) and
    raise Unavailable. Returns the number of records applied; the spool is gone on success."""
    run_dir = Path(run_dir)
    ops = read(run_dir)
    done = 0
    for start, end, op in _groups(ops):
        try:
            apply(client, op, runs, run_dir)
        except Exception as exc:  # noqa: BLE001 - sorted into outage / refusal below
            if is_transient(exc):
                _rewrite(run_dir, runs, ops[start:])
                raise Unavailable(str(exc)) from exc
            for bad in ops[start:end]:
                reject(run_dir, bad, exc)
        done = end
    (run_dir / SPOOL_FILE).unlink(missing_ok=True)
    shutil.rmtree(run_dir / SPOOL_FILES_DIR, ignore_errors=True)
    return done


def _rewrite(run_dir: Path, runs: dict[str, str], rest: list[dict]) -> None:
    binds = [{"op": "bind", "key": k, "run_id": v} for k, v in runs.items()]
    tmp = run_dir / (SPOOL_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(op) + "\n" for op in binds + rest), encoding="utf-8")
    os.replace(tmp, run_dir / SPOOL_FILE)


def chunked(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@contextmanager
def http_limits(timeout_s: int, max_retries: int) -> Iterator[None]:
    """Short MLflow HTTP timeouts and no backoff sleeps for the calls inside, so a dead
    server costs seconds; MLflow reads these variables per request. Restored afterwards."""
    values = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
