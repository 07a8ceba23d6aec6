"""The spooling Tracker (gad_megatron/tracking/tracker.py) against a real local MLflow server
(127.0.0.1, sqlite backend, proxied artifacts): read-back, a server that is down at the start,
one that goes away and comes back mid-run (through a switchable loopback relay), the default
local store; redaction; health rules."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from gad_megatron.parallel.launch import free_port
from gad_megatron.tracking.config import TrackingConfig
from gad_megatron.tracking.health import HealthWatch
from gad_megatron.tracking.redact import is_secret_key, redact_params, redact_uri
from gad_megatron.tracking.tracker import (
    Tracker, TrackingUnavailableWarning, find_run_id, git_commit, replay_spool)

SPOOL = "mlflow_spool.jsonl"


class Server:
    """`mlflow server` on 127.0.0.1 in its own process group (uvicorn runs as a child)."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.root.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
             "--artifacts-destination", str(self.root / "art")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not answer within 90 s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started, only
        self.proc.wait(timeout=20)


class Switch:
    """A loopback TCP relay in front of a server that can be cut and restored at once:
    an outage (refused connections, dropped keep-alive ones) without restarting mlflow."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []

    def on(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def off(self) -> None:
        if self.listener is not None:
            try:  # wakes the accept() of the relay thread (close alone does not on Linux)
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self.conns = []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by off()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield srv.start()
    finally:
        srv.stop()


def cfg(uri: str, **kw) -> TrackingConfig:
    return TrackingConfig(tracking_uri=uri, samples_every=2, retry_s=0.0, http_timeout_s=2,
                          **kw)


PARAMS = {"train": {"steps": 4, "stage": "gad"}, "run": {"ray_address": "ray://u:hunter2@h:1"},
          "judge": {"api_key": "sk-123"}, "rollout": {"max_new_tokens": 16},
          "long": "x" * 7000}


def steps(tracker: Tracker, first: int, last: int) -> None:
    for step in range(first, last):
        tracker.log_metrics(step, {"d/d_acc": 0.5 + 0.1 * step, "g/kl": 0.01 * step,
                                   "g/reward_mean": -step, "g/response_len_mean": 10.0,
                                   "g/teacher_len_mean": 12.0, "step": step, "note": "x"})
        tracker.log_samples(step, [{"prompt": "p", "teacher": "t", "student": f"s{step}",
                                    "teacher_score": 1.0, "student_score": 0.1 * step}])


def test_live_server_read_back(tmp_path, server):
    from mlflow.tracking import MlflowClient

    warm = Tracker(cfg(server.uri), tmp_path / "job" / "warmup", "warmup", PARAMS)
    steps(warm, 0, 3)
    warm.finish()
    parent = find_run_id(tmp_path / "job" / "warmup")
    assert parent == warm.run_id
    with Tracker(cfg(server.uri), tmp_path / "job" / "gad", "gad", PARAMS,
                 parent_run_id=parent) as gad:
        steps(gad, 0, 4)
        gad.log_text("hello", "notes/a.txt")
        (tmp_path / "extra.txt").write_text("extra")
        gad.log_artifact(tmp_path / "extra.txt")
    client = MlflowClient(server.uri)
    run = client.get_run(gad.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["git.commit"] == git_commit() and run.data.tags["git.commit"] == git_commit()
    assert params["train.steps"] == "4" and params["rollout.max_new_tokens"] == "16"
    assert params["judge.api_key"] == "***" and params["run.ray_address"] == "ray://u:***@h:1"
    assert len(params["long"]) == 6000 and "hunter2" not in json.dumps(params)
    assert run.data.tags["gad.parent_run_id"] == parent
    assert run.data.tags["mlflow.parentRunId"] == parent
    history = client.get_metric_history(gad.run_id, "d/d_acc")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7),
                                                              (3, 0.8)]
    assert "note" not in run.data.metrics and "step" not in run.data.metrics
    arts = {a.path for a in client.list_artifacts(gad.run_id)}
    assert {"plots", "notes", "samples_table.json", "extra.txt"} <= arts
    plots = {a.path for a in client.list_artifacts(gad.run_id, "plots")}
    assert {"plots/d_acc.png", "plots/reward.png", "plots/kl.png", "plots/length.png"} <= plots
    table = json.loads(Path(client.download_artifacts(gad.run_id, "samples_table.json",
                                                      str(tmp_path / "dl"))).read_text())
    assert table["columns"][:4] == ["step", "prompt", "teacher", "student"]
    assert [row[0] for row in table["data"]] == [0, 2]  # samples_every=2
    lines = (tmp_path / "job" / "gad" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["student"] for line in lines] == ["s0", "s2"]
    assert not (tmp_path / "job" / "gad" / SPOOL).exists()


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / SPOOL).read_text().splitlines()]


def test_server_down_then_replay_spool(tmp_path, server):
    from mlflow.tracking import MlflowClient

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(cfg(dead), run_dir, "warmup", PARAMS)
        steps(tracker, 0, 5)
        (tmp_path / "mine.txt").write_text("v1")
        tracker.log_artifact(tmp_path / "mine.txt")
        (tmp_path / "mine.txt").write_text("changed after the call")
        tracker.finish()
    assert time.monotonic() - t0 < 30
    assert sum(issubclass(w.category, TrackingUnavailableWarning) for w in caught) == 1
    assert "hunter2" not in (run_dir / SPOOL).read_text()
    kinds = [r["op"] for r in _records(run_dir)]
    assert kinds[0] == "start" and kinds[-1] == "end" and tracker.run_id is None
    assert find_run_id(run_dir) is None

    from gad_megatron.tracking.__main__ import main

    assert main(["replay", str(run_dir), "--uri", dead]) == 1  # still down: the spool stays
    assert [r["op"] for r in _records(run_dir)] == kinds
    assert replay_spool(run_dir, server.uri) == len(kinds)
    assert not (run_dir / SPOOL).exists()
    run_id = find_run_id(run_dir)
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["judge.api_key"] == "***"
    assert [m.step for m in client.get_metric_history(run_id, "g/kl")] == [0, 1, 2, 3, 4]
    got = Path(client.download_artifacts(run_id, "mine.txt", str(tmp_path / "dl")))
    assert got.read_text() == "v1"  # the file as it was when logged
    assert {a.path for a in client.list_artifacts(run_id, "plots")} >= {"plots/d_acc.png"}


def test_server_goes_away_and_comes_back_mid_run(tmp_path, server):
    from mlflow.tracking import MlflowClient

    switch = Switch(server.port)
    run_dir = tmp_path / "run"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = Tracker(cfg(switch.uri), run_dir, "gad", PARAMS)  # down at the start
            steps(tracker, 0, 2)
            assert not tracker.online and tracker.run_id is None
            switch.on()
            steps(tracker, 2, 4)  # the next call reconnects and replays the spool first
            assert tracker.online and tracker.run_id and not (run_dir / SPOOL).exists()
            switch.off()
            steps(tracker, 4, 6)  # down again mid-run: spooled under the run's id
            assert not tracker.online
            assert _records(run_dir)[0] == {"op": "bind", "key": tracker.key,
                                            "run_id": tracker.run_id}
            switch.on()
            tracker.finish()
        assert sum(issubclass(w.category, TrackingUnavailableWarning) for w in caught) == 1
        assert tracker.online and not (run_dir / SPOOL).exists()
        client = MlflowClient(server.uri)
        history = client.get_metric_history(tracker.run_id, "d/d_acc")
        assert [m.step for m in history] == list(range(6))
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        switch.off()


def test_default_local_store_without_server(tmp_path):
    from mlflow.tracking import MlflowClient

    local = TrackingConfig(samples_every=0)
    warm = Tracker(local, tmp_path / "job" / "warmup", "warmup", {"a": 1})
    steps(warm, 0, 2)
    warm.finish()
    gad = Tracker(local, tmp_path / "job" / "gad", "gad", {"a": 2}, parent_run_id=warm.run_id)
    gad.finish("FAILED")
    db = tmp_path / "job" / "mlflow.db"
    assert db.is_file() and not (Path.cwd() / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{db}")
    assert client.get_run(warm.run_id).data.metrics["d/d_acc"] == pytest.approx(0.6)
    run = client.get_run(gad.run_id)
    assert run.info.status == "FAILED" and run.data.tags["mlflow.parentRunId"] == warm.run_id
    assert (tmp_path / "job" / "mlartifacts").is_dir()  # artifacts beside the job, not in cwd
    assert not (tmp_path / "job" / "warmup" / "samples.jsonl").exists()  # samples_every=0
    again = Tracker(local, tmp_path / "job" / "warmup", "warmup", {"a": 1}, resume=True)
    steps(again, 2, 3)
    again.finish()
    assert again.run_id == warm.run_id  # a resumed stage continues its run
    assert [m.step for m in client.get_metric_history(warm.run_id, "g/kl")] == [0, 1, 2]


def test_a_resume_with_a_changed_setting_keeps_every_param_and_tags_the_change(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    local = TrackingConfig(samples_every=0)
    first = {"train": {"steps": 5}, "a": 1}
    run = Tracker(local, tmp_path / "job" / "warmup", "warmup", first)
    run.finish()
    again = Tracker(local, tmp_path / "job" / "warmup", "warmup",
                    {"train": {"steps": 7}, "a": 1}, resume=True, previous_params=first)
    again.finish()
    assert "resuming with changed settings: train.steps 5 -> 7" in capsys.readouterr().out
    data = MlflowClient(f"sqlite:///{tmp_path / 'job' / 'mlflow.db'}").get_run(run.run_id).data
    assert data.params["train.steps"] == "5" and data.params["a"] == "1"
    assert data.tags["changed.train.steps"] == "7 (was 5)"
    assert not (tmp_path / "job" / "warmup" / "mlflow_rejected.jsonl").exists()


def test_the_store_down_warning_is_one_clean_line(tmp_path):
    """As a user sees it: a fresh interpreter, Python's default warning display."""
    import subprocess
    import sys

    dead = f"http://127.0.0.1:{free_port()}"
    code = ("import sys; from gad_megatron.tracking.tracker import Tracker; "
            "from gad_megatron.tracking.config import TrackingConfig; "
            "t = Tracker(TrackingConfig(tracking_uri=sys.argv[1], http_timeout_s=2, "
            "http_max_retries=0, samples_every=0), sys.argv[2], 'warmup', {}); t.finish()")
    res = subprocess.run([sys.executable, "-c", code, dead, str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if "TrackingUnavailableWarning" in ln]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("gad_megatron.tracking:0: TrackingUnavailableWarning: MLflow "
                               f"tracking store {dead} does not answer ([Errno 111] "
                               "Connection refused); training goes on")
    assert "warnings.warn" not in res.stderr and "HTTPConnectionPool" not in res.stderr


def test_disabled_tracker_still_writes_local_files(tmp_path):
    tracker = Tracker(TrackingConfig(enabled=False, samples_every=1), tmp_path, "gad", {})
    steps(tracker, 0, 2)
    tracker.finish()
    assert (tmp_path / "samples.jsonl").is_file() and (tmp_path / "plots" / "d_acc.png").is_file()
    assert not (tmp_path / SPOOL).exists() and not (tmp_path.parent / "mlflow.db").exists()


def test_secrets_are_redacted():
    assert redact_uri("postgresql://bob:s3cret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    assert redact_uri("see http://u:p@h:1/a and https://h/x?token=abc&q=1") == \
        "see http://u:***@h:1/a and https://h/x?token=***&q=1"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    for key in ("hf_token", "judge.api_key", "db.password", "AWS_SECRET_ACCESS_KEY", "token",
                "tracking.auth"):
        assert is_secret_key(key), key
    for key in ("rollout.max_new_tokens", "actor.micro_batch_tokens", "data.tokenizer",
                "model.hf_path", "author"):
        assert not is_secret_key(key), key
    out = redact_params({"a.hf_token": "hf_x", "b.uri": "mysql://u:pw@h/db", "c.n": 3,
                         "d.password": ""})
    assert out == {"a.hf_token": "***", "b.uri": "mysql://u:***@h/db", "c.n": 3,
                   "d.password": ""}


def _fire(watch: HealthWatch, seq: list[dict]) -> list[list[str]]:
    return [[w.name for w in watch.update(step, m)] for step, m in enumerate(seq)]


def test_health_d_acc_patience_and_rearm():
    watch = HealthWatch(TrackingConfig(d_acc_patience=3))
    seq = [{"d/d_acc": 0.5}] * 4 + [{"d/d_acc": 0.7}] + [{"d/d_acc": 0.52}] * 3 \
        + [{"d/d_acc": 0.95}] * 3 + [{"g/kl": 0.1}]
    assert _fire(watch, seq) == [[], [], ["d_acc_low"], [], [], [], [], ["d_acc_low"],
                                 [], [], ["d_acc_high"], []]


def test_health_gap_length_and_clip():
    watch = HealthWatch(TrackingConfig())
    seq = [{"d/score_gap": 3.0, "g/response_len_mean": 20, "g/teacher_len_mean": 10},
           {"d/score_gap": -12.0, "g/response_len_mean": 25, "g/teacher_len_mean": 10},
           {"d/score_gap": 11.0, "g/response_len_mean": 4, "g/teacher_len_mean": 10},
           {"d/score_gap": 1.0, "g/response_len_mean": 10, "g/teacher_len_mean": 10}]
    assert _fire(watch, seq) == [[], ["score_gap", "length_ratio"], [], []]
    warning = HealthWatch(TrackingConfig()).update(7, seq[1])[0]
    assert isinstance(warning, str) and "step 7" in warning and "score gap" in warning
    clip = HealthWatch(TrackingConfig())
    # on-policy single pass: a zero clip fraction is expected and says nothing
    seq = [{"g/clip_frac": 0.0}] * 2 + [{"g/clip_frac": 0.5}, {"g/clip_frac": 0.2},
                                        {"g/clip_frac": 0.02}, {"g/clip_frac": 0.05}]
    assert _fire(clip, seq) == [[], [], ["clip_frac"], [], ["clip_frac"], []]


def test_a_refused_run_is_kept_aside_and_not_retried(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class Refusing:
        calls = 0

        def get_experiment_by_name(self, name):
            Refusing.calls += 1
            raise MlflowException("refused", error_code=INVALID_PARAMETER_VALUE)

    monkeypatch.setattr(Tracker, "_client_", lambda self: Refusing())
    tracker = Tracker(TrackingConfig(), tmp_path / "r", "warmup", {"a": 1})
    steps(tracker, 0, 2)
    tracker.finish()
    rejected = (tmp_path / "r" / "mlflow_rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["record"]["op"] for line in rejected] == ["start"]
    assert Refusing.calls == 1 and not (tmp_path / "r" / SPOOL).exists()


def test_experiments_are_marked_as_model_training(tmp_path):
    """MLflow 3's UI opens an experiment without a kind on its GenAI view; ours carry the
    training kind, including one an older version created untagged."""
    from mlflow.tracking import MlflowClient

    from gad_megatron.tracking.spool import EXPERIMENT_KIND, get_or_create_experiment

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    new = get_or_create_experiment(client, "fresh", None)
    old = client.create_experiment("older")  # untagged, as before this tag existed
    assert get_or_create_experiment(client, "older", None) == old
    for exp_id in (new, old):
        assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
