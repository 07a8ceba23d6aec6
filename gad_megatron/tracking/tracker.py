"""The driver's MLflow run of one stage: params, metrics, samples, plots, health tags.

Only the driver process (the controller) holds a Tracker; workers never log. Training never
waits on the tracking store: when it does not answer, each call is spooled to
`<run_dir>/mlflow_spool.jsonl` (see spool.py), a warning is given once, and the spool is
replayed when the store answers again (tried at most every `retry_s`, and at `finish`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
import uuid
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from gad_megatron.tracking import spool
from gad_megatron.tracking.config import TrackingConfig
from gad_megatron.tracking.health import HealthWarning, HealthWatch
from gad_megatron.tracking.plots import write_plots
from gad_megatron.tracking.redact import redact_params, redact_uri

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SAMPLES_TABLE = "samples_table.json"
STATUSES = ("FINISHED", "FAILED", "KILLED")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


class TrackingUnavailableWarning(UserWarning):
    """The tracking store does not answer; calls are spooled locally and replayed later."""


def find_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id a stage wrote to `<run_dir>/mlflow_run_id.txt`, if any."""
    path = Path(run_dir) / spool.RUN_ID_FILE
    text = path.read_text().strip() if path.is_file() else ""
    return text or None


def runs_page(store_uri: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The `mlflow ui` address of a run's experiment on its training view (runs, metrics,
    curves). MLflow 3's UI keeps the view it last showed per browser and opens GenAI
    (traces) by default whatever the experiment's tags say; the `workflowType` parameter
    selects the training view."""
    from mlflow.tracking import MlflowClient

    exp_id = MlflowClient(tracking_uri=store_uri).get_run(run_id).info.experiment_id
    return f"{ui}/#/experiments/{exp_id}?workflowType=machine_learning"


def default_uri(run_dir: str | Path) -> str:
    """The job's local SQLite store, `<run_dir>/../mlflow.db` (MLflow advises SQLite over its
    file store). Shared by the stages of a job (runs/x/warmup, runs/x/gad), so the gad run
    can be nested under its warmup run."""
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def git_commit() -> str:
    """HEAD of the code's repository (else of the working directory), or 'unknown'."""
    for where in (Path(__file__).resolve().parents[2], Path.cwd()):
        try:
            out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def replay_spool(run_dir: str | Path, tracking_uri: str = "", timeout_s: int = 30,
                 max_retries: int = 2) -> int:
    """Upload what a run spooled while its store was down. Returns the records applied;
    raises spool.Unavailable (the rest stays spooled) when the store still does not answer.
    `tracking_uri` '' means the job's local SQLite store (`default_uri`)."""
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    with spool.http_limits(timeout_s, max_retries):
        return spool.replay(MlflowClient(tracking_uri or default_uri(run_dir)), run_dir, {})


def _flat(params: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    if len(text) > spool.MAX_PARAM_LEN:  # MLflow refuses longer values outright
        text = text[: spool.MAX_PARAM_LEN - 14] + "...[truncated]"
    return text


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _changed(previous: dict | None, params: dict) -> dict[str, tuple[str, str]]:
    """Flattened params whose text differs from the previous run's (key -> (old, new))."""
    if not previous:
        return {}
    old = {k: _param_text(v) for k, v in redact_params(_flat(previous)).items()}
    new = {k: _param_text(v) for k, v in redact_params(params).items()}
    return {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k]
            and k != "git.commit"}


def _reason(exc: BaseException) -> str:
    """The short cause of a connection failure ('[Errno 111] Connection refused'), not the
    whole chain of wrapped exceptions; secrets in URLs masked."""
    text = redact_uri(str(exc))
    errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    if errno:
        return errno.group(0).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 160 else first[:160].rsplit(" ", 1)[0] + " ..."


class Tracker:
    """One MLflow run for one stage of a job; see the module docstring."""

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, stage: str, params: dict,
                 parent_run_id: str | None = None, tags: dict | None = None,
                 resume: bool = False, previous_params: dict | None = None):
        self.cfg, self.stage = cfg, stage
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = cfg.tracking_uri or default_uri(self.run_dir)
        self.health = HealthWatch(cfg)
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.key = uuid.uuid4().hex  # the run's name in the spool until the store gives an id
        self.runs: dict[str, str] = {}
        self._client = None
        self._online, self._warned, self._last_try = True, False, 0.0
        self._table_tagged = self._finished = self._refused = False
        if not cfg.enabled:
            return
        if spool.read(self.run_dir):  # a previous process left records: they go first
            self._online, self._last_try = False, float("-inf")
        commit = git_commit()
        self._submit(self._start_record(commit, parent_run_id, tags or {}, resume))
        params = {**_flat(params), "git.commit": commit}
        changed = _changed(previous_params, params) if resume else {}
        if changed:
            # MLflow params are write-once: a resumed run keeps the first values there and
            # records each new one as a tag, rather than having the whole batch refused.
            print("resuming with changed settings: " + ", ".join(
                f"{k} {old} -> {new}" for k, (old, new) in changed.items()), flush=True)
            self.set_tags({f"changed.{k}": f"{new} (was {old})"
                           for k, (old, new) in changed.items()})
        self.log_params({k: v for k, v in params.items() if k not in changed})

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None while the run exists only in the spool)."""
        return self.runs.get(self.key)

    @property
    def online(self) -> bool:
        return self._online

    def _start_record(self, commit: str, parent: str | None, tags: dict, resume: bool) -> dict:
        all_tags = {"gad.stage": self.stage, "gad.run_dir": str(self.run_dir.resolve()),
                    "mlflow.source.git.commit": commit, "git.commit": commit,
                    **redact_params({str(k): str(v) for k, v in tags.items()})}
        if parent:
            all_tags["gad.parent_run_id"] = parent
        local = not spool.is_remote(self.uri)
        name = self.cfg.run_name or f"{self.run_dir.resolve().parent.name}/{self.run_dir.name}"
        return {"op": "start", "key": self.key, "experiment": self.cfg.experiment,
                "run_name": name, "tags": all_tags, "time": spool.now_ms(),
                "parent_run_id": parent,
                "resume_run_id": find_run_id(self.run_dir) if resume else None,
                # a local store would otherwise put artifacts under the *working directory*
                "artifact_location": ((self.run_dir.resolve().parent / "mlartifacts").as_uri()
                                      if local else None)}

    # ------------------------------------------------------------------ logging calls
    def log_params(self, params: dict) -> None:
        """Flattened, secrets masked, values cut to MLflow's 6000 chars, 100 per request."""
        flat = redact_params(_flat(params))
        items = [(k[:250], _param_text(v)) for k, v in flat.items()]
        for chunk in spool.chunked(items, spool.MAX_PARAMS):
            self._submit({"op": "batch", "key": self.key, "params": dict(chunk)})

    def log_metrics(self, step: int, metrics: dict) -> list[HealthWarning]:
        """Log the numeric entries of `metrics` at `step`; returns the health warnings that
        start at this step (also set as tags `health.<rule>`), for the caller to print."""
        ts, items = spool.now_ms(), []
        for key, value in metrics.items():
            if key == "step":
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            key = _BAD_KEY_CHARS.sub("_", str(key))  # one bad name must not sink the batch
            self.history[key].append((step, value))
            items.append([key, value, ts, int(step)])
        for chunk in spool.chunked(items, spool.MAX_METRICS):
            self._submit({"op": "batch", "key": self.key, "metrics": chunk})
        found = self.health.update(step, metrics)
        if found:
            self.set_tags({f"health.{w.name}": str(w) for w in found})
        if self.cfg.plots_every and (step + 1) % self.cfg.plots_every == 0:
            self.write_plots()
        return found

    def set_tags(self, tags: dict) -> None:
        items = [(str(k)[:250], str(v)[: spool.MAX_TAG_LEN])
                 for k, v in redact_params({str(k): v for k, v in tags.items()}).items()]
        for chunk in spool.chunked(items, spool.MAX_TAGS):
            self._submit({"op": "batch", "key": self.key, "tags": dict(chunk)})

    def samples_due(self, step: int) -> bool:
        """Whether `log_samples` will record this step (every `samples_every` steps)."""
        return self.cfg.samples_every > 0 and step % self.cfg.samples_every == 0

    def log_samples(self, step: int, rows: list[dict], force: bool = False) -> bool:
        """Append rows (prompt, teacher, student, D scores, ...) to `<run_dir>/samples.jsonl`
        and upload the whole table as the `samples_table.json` table artifact. Only on
        `samples_due` steps unless `force`; returns whether it logged."""
        if not rows or not (force or self.samples_due(step)):
            return False
        with (self.run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, default=_jsonable) + "\n")
        table = self._write_table()
        if not self.cfg.enabled:
            return True
        self._submit({"op": "artifact", "key": self.key, "path": str(table),
                      "artifact_path": None})
        if not self._table_tagged:  # lets the MLflow UI show the file as a table
            self._table_tagged = True
            self.set_tags({"mlflow.loggedArtifacts":
                           json.dumps([{"path": SAMPLES_TABLE, "type": "table"}])})
        return True

    def _write_table(self) -> Path:
        rows = [json.loads(line) for line in
                (self.run_dir / SAMPLES_FILE).read_text(encoding="utf-8").splitlines() if line]
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        path = self.run_dir / SAMPLES_TABLE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"columns": columns,
                                   "data": [[r.get(c) for c in columns] for r in rows]}))
        tmp.replace(path)
        return path

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory; snapshotted into the spool if the store is down."""
        self._submit({"op": "artifact", "key": self.key, "path": str(Path(path).resolve()),
                      "artifact_path": artifact_path, "snapshot": True})

    def log_text(self, text: str, name: str) -> None:
        """`text` as artifact `name` (e.g. 'notes/eval.md'); a copy stays in the run dir."""
        local = self.run_dir / "mlflow_text" / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text, encoding="utf-8")
        parent = str(Path(name).parent)
        self._submit({"op": "artifact", "key": self.key, "path": str(local.resolve()),
                      "artifact_path": None if parent == "." else parent})

    def write_plots(self) -> list[Path]:
        """PNGs of the key curves under `<run_dir>/plots`, uploaded under `plots/`."""
        guides = {"d_acc_low": self.cfg.d_acc_low, "d_acc_high": self.cfg.d_acc_high}
        files = write_plots(self.history, self.run_dir / "plots", guides)
        for path in files:
            self._submit({"op": "artifact", "key": self.key, "path": str(path.resolve()),
                          "artifact_path": "plots"})
        return files

    def finish(self, status: str = "FINISHED") -> None:
        """Plots, end of the run, and a last replay attempt of anything still spooled."""
        if self._finished:
            return
        self._finished = True
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        try:
            self.write_plots()
        except Exception:  # noqa: BLE001 - a plotting problem must not fail the run's end
            log.exception("tracking: writing the plots failed")
        self._submit({"op": "end", "key": self.key, "status": status, "time": spool.now_ms()})
        if self.cfg.enabled and not self._online and not self._reconnect(force=True):
            log.warning("tracking: %s still does not answer; the run's MLflow records stay "
                        "in %s. Upload them later with: python -m gad_megatron.tracking "
                        "replay %s --uri <tracking uri>", redact_uri(self.uri),
                        self.run_dir / spool.SPOOL_FILE, self.run_dir)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else
                    "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # ------------------------------------------------------------------ store / spool
    def _client_(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _submit(self, op: dict) -> None:
        if not self.cfg.enabled or self._refused:
            return
        if self._online:
            try:
                with spool.http_limits(self.cfg.http_timeout_s, self.cfg.http_max_retries):
                    spool.apply(self._client_(), op, self.runs, self.run_dir)
                return
            except Exception as exc:  # noqa: BLE001 - sorted into outage / refusal
                if not spool.is_transient(exc):
                    spool.reject(self.run_dir, op, exc)
                    # without a run every later call would be refused too: stop asking
                    self._refused = op["op"] == "start"
                    return
                self._outage(exc)
        self._spool(op)
        self._reconnect()

    def _spool(self, op: dict) -> None:
        if not (self.run_dir / spool.SPOOL_FILE).exists():
            # records of a run the store already knows need its id to be replayed
            for key, run_id in self.runs.items():
                spool.append(self.run_dir, {"op": "bind", "key": key, "run_id": run_id})
        if op.get("snapshot"):  # the caller's file may change or go before the replay
            op = dict(op, path=self._snapshot(Path(op["path"])))
        spool.append(self.run_dir, op)

    def _snapshot(self, src: Path) -> str:
        dest = self.run_dir / spool.SPOOL_FILES_DIR / uuid.uuid4().hex[:12] / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copy2(src, dest)
        except OSError as exc:
            log.warning("tracking: could not snapshot %s (%s); the replay reads it in place",
                        src, exc)
            return str(src)
        return str(dest)

    def _outage(self, exc: BaseException) -> None:
        self._online, self._last_try = False, time.monotonic()
        message = (f"MLflow tracking store {redact_uri(self.uri)} does not answer "
                   f"({_reason(exc)}); training goes on, its records are kept in "
                   f"{self.run_dir / spool.SPOOL_FILE} and replayed when it answers again")
        if not self._warned:
            self._warned = True
            # warn_explicit with no source file: the warning prints as one line, without
            # the Python source line `warnings.warn` would quote.
            warnings.warn_explicit(message, TrackingUnavailableWarning,
                                   filename="gad_megatron.tracking", lineno=0)
        else:
            log.info("tracking: %s", message)

    def _reconnect(self, force: bool = False) -> bool:
        if self._online:
            return True
        if not force and time.monotonic() - self._last_try < self.cfg.retry_s:
            return False
        self._last_try = time.monotonic()
        try:
            with spool.http_limits(self.cfg.http_timeout_s, self.cfg.http_max_retries):
                done = spool.replay(self._client_(), self.run_dir, self.runs)
        except Exception as exc:  # noqa: BLE001 - still down: stay offline
            self._outage(exc)
            return False
        self._online = True
        log.info("tracking: %s answers again; replayed %d spooled records",
                 redact_uri(self.uri), done)
        return True
