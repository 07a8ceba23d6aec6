"""MLflow tracking against a real local server (127.0.0.1, sqlite backend), with the server
down, and the default local store; secrets redaction; the health watch's rules."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from gad_megatron.parallel.launch import free_port
from gad_megatron.tracking import (
    HealthConfig, HealthWatch, Tracker, TrackingConfig, find_run_id, redact, replay_spool,
    safe_params)


def start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server_art"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start within 90 s")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def run_a_stage(uri: str, run_dir: Path, stage: str, parent=None) -> Tracker:
    cfg = TrackingConfig(tracking_uri=uri, samples_every=1, retry_s=0.0)
    (run_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"train": {"stage": stage}}))
    tracker = Tracker(cfg, run_dir, stage, {"train.steps": 3, "run.ray_address":
                                            "http://user:hunter2@10.0.0.1:6379"}, parent)
    for step in range(3):
        tracker.log_metrics(step, {"d/d_acc": 0.5 + 0.1 * step, "g/kl": 0.01 * step})
    tracker.log_samples(0, [{"prompt": "p", "teacher": "t", "student": "s",
                             "teacher_score": 1.0, "student_score": 0.0}])
    tracker.finish()
    return tracker


def test_runs_metrics_and_artifacts_read_back_from_a_real_server(tmp_path, server):
    from mlflow.tracking import MlflowClient

    warm = run_a_stage(server, tmp_path / "job" / "warmup", "warmup")
    gad = run_a_stage(server, tmp_path / "job" / "gad", "gad", parent=warm.run_id)
    client = MlflowClient(server)
    run = client.get_run(gad.run_id)
    assert run.data.params["train.steps"] == "3"
    assert run.data.params["git_commit"] != ""
    assert "hunter2" not in json.dumps(run.data.params)
    assert run.data.tags["mlflow.parentRunId"] == warm.run_id
    history = client.get_metric_history(gad.run_id, "d/d_acc")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    arts = {a.path for a in client.list_artifacts(gad.run_id)}
    assert {"plots", "samples", "config.json"} <= arts
    assert {a.path for a in client.list_artifacts(gad.run_id, "plots")} >= {
        "plots/d_acc.png", "plots/kl.png"}
    assert run.info.status == "FINISHED"
    assert find_run_id(tmp_path / "job" / "gad") == gad.run_id


def test_server_down_loses_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()  # nothing listens here yet
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_a_stage(uri, tmp_path / "run", "warmup")
    assert time.monotonic() - start < 60
    assert sum("unreachable" in str(w.message) for w in caught) == 1
    spool = tmp_path / "run" / "mlflow_spool.jsonl"
    kinds = [json.loads(line)["kind"] for line in spool.read_text().splitlines()]
    assert kinds[0] == "start" and kinds.count("metrics") == 3 and kinds[-1] == "end"

    proc = start_server(tmp_path, port)
    try:
        assert replay_spool(tmp_path / "run", uri) == len(kinds)
        run_id = find_run_id(tmp_path / "run")
        history = MlflowClient(uri).get_metric_history(run_id, "g/kl")
        assert [m.step for m in history] == [0, 1, 2]
        assert not spool.exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_default_store_is_a_local_sqlite_file_beside_the_job(tmp_path):
    from mlflow.tracking import MlflowClient

    tracker = run_a_stage("", tmp_path / "job" / "warmup", "warmup")
    db = tmp_path / "job" / "mlflow.db"
    assert db.is_file()
    run = MlflowClient(f"sqlite:///{db}").get_run(tracker.run_id)
    assert run.data.metrics["d/d_acc"] == pytest.approx(0.7)


def test_secrets_never_reach_params():
    assert redact("postgresql://bob:s3cret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    out = safe_params({"tracking.api_key": "abc", "judge.token": "t", "model.hf_path": "/m",
                       "run.ray_address": "ray://u:pw@h:1"})
    assert out == {"tracking.api_key": "***", "judge.token": "***", "model.hf_path": "/m",
                   "run.ray_address": "ray://u:***@h:1"}


def test_health_watch_rules():
    watch = HealthWatch(HealthConfig(patience=2))
    fired = [watch.update(s, {"d/d_acc": 0.5, "g/response_len_mean": 30,
                              "g/teacher_len_mean": 10}) for s in range(3)]
    assert fired[0] == []  # patience: not yet
    assert sorted(n for n, _ in fired[1]) == ["d_acc_low", "length_ratio"]
    assert fired[2] == []  # warned once per episode
    assert watch.update(3, {"d/d_acc": 0.7}) == []  # conditions clear, re-armed
    watch.update(4, {"d/d_acc": 0.95, "d/score_gap": 12.0})
    names = sorted(n for n, _ in watch.update(5, {"d/d_acc": 0.95, "d/score_gap": 12.0}))
    assert names == ["d_acc_high", "score_gap"]
    clip = HealthWatch(HealthConfig(patience=1), clip_checks=True)
    assert [n for n, _ in clip.update(0, {"g/clip_frac": 0.5})] == ["clip_frac"]
    assert HealthWatch(HealthConfig(patience=1), clip_checks=False).update(
        0, {"g/clip_frac": 0.0}) == []
