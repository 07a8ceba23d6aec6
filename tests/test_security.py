"""Security checks: pickle weights refused unless allowed (then tensors only), no
trust_remote_code anywhere, Ray and MLflow listening on loopback only, and secrets never
written to a run directory, its logs, MLflow params or artifacts."""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from gad_megatron.__main__ import main
from gad_megatron.checkpoint.hf_io import (
    CheckpointMismatch, HFTensorIndex, PickleRefused, safe_weights_dir)
from gad_megatron.config import ConfigError, load_config
from gad_megatron.models.hf_config import read_hf_config
from gad_megatron.parallel.launch import free_port
from tests.reliability import record
from tests.tiny_models import make_hf_model, small_run

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]


# --- (a) pickle checkpoints ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny HF model whose weights are only `pytorch_model.bin` (a pickle)."""
    d = make_hf_model("qwen3", tmp_path_factory.mktemp("hf") / "m")
    shard = next(d.glob("*.safetensors"))
    state = load_file(shard)
    torch.save(state, d / "pytorch_model.bin")
    shard.unlink()
    return d, state


def test_pickle_weights_are_refused_by_training_and_convert(pickle_model, tmp_path, capsys):
    model, _ = pickle_model
    cfg = small_run(tmp_path, "run", "warmup", "train.steps=1", f"model.hf_path={model}",
                    "data.tokenizer=builtin", "tracking.enabled=false")
    from gad_megatron.trainer.controller import train

    t0 = time.monotonic()
    with pytest.raises(PickleRefused) as err:
        train(cfg, backend="inline")
    seconds = time.monotonic() - t0
    assert str(err.value).startswith(f"{model}: weights only as pickle (pytorch_model.bin), "
                                     "refused") and "model.allow_pickle=true" in str(err.value)
    assert not (tmp_path / "run" / "hf_weights").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(["convert", "hf-to-megatron", "--hf", str(model), "--out",
                 str(tmp_path / "mc")]) == 1
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and "--allow-pickle" in line[0] and not (tmp_path / "mc").exists()
    record("HF model with only pytorch_model.bin (pickle)", f"error: {str(err.value)[:120]}...",
           seconds, "nothing: no worker started, no file unpickled")


def test_allowed_pickle_trains_from_a_safetensors_copy(pickle_model, tmp_path):
    from gad_megatron.trainer.controller import train

    model, state = pickle_model
    cfg = small_run(tmp_path, "run", "warmup", "train.steps=1", f"model.hf_path={model}",
                    "data.tokenizer=builtin", "tracking.enabled=false", "model.allow_pickle=true",
                    "rollout.max_new_tokens=4")
    assert len(train(cfg, backend="inline")) == 1
    copy = tmp_path / "run" / "hf_weights"
    assert [p.name for p in copy.glob("*.safetensors")] == ["model.safetensors"]
    assert not list(copy.glob("*.bin"))


def test_allowed_pickle_is_read_with_weights_only_into_safetensors(pickle_model, tmp_path):
    model, state = pickle_model
    copy = safe_weights_dir(model, tmp_path / "copy", allow_pickle=True)
    assert copy == tmp_path / "copy" and not list(copy.glob("*.bin"))
    HFTensorIndex(copy).check_against(read_hf_config(copy))  # a complete safetensors dir
    index = HFTensorIndex(copy)
    assert all(torch.equal(index.get(k), v) for k, v in state.items())
    assert safe_weights_dir(copy, tmp_path / "x", allow_pickle=False) == copy  # no pickle


class _Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_even_when_pickles_are_allowed(pickle_model, tmp_path):
    model, _ = pickle_model
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "config.json").write_bytes((model / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, hostile / "pytorch_model.bin")
    t0 = time.monotonic()
    with pytest.raises(CheckpointMismatch) as err:
        safe_weights_dir(hostile, tmp_path / "copy", allow_pickle=True)
    seconds = time.monotonic() - t0
    assert not marker.exists()  # the payload never ran
    assert str(err.value).startswith(f"{hostile / 'pytorch_model.bin'}: refused by "
                                     "torch.load(weights_only=True)")
    assert not (tmp_path / "copy").exists()
    record("pickle weights holding code (allow_pickle=true)", str(err.value)[:140], seconds,
           "nothing: the code did not run")


# --- (b) trust_remote_code ---------------------------------------------------------------------
def _python_files():
    for top in ("gad_megatron", "megatron_patches"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_trust_remote_code_is_never_set():
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                value = node.value
            elif isinstance(node, ast.Dict):
                value = next((v for k, v in zip(node.keys, node.values)
                              if isinstance(k, ast.Constant) and k.value == "trust_remote_code"),
                             None)
            else:
                continue
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}")
    assert found == [], found
    texts = [p.read_text(encoding="utf-8") for p in (ROOT / "configs").rglob("*.yaml")]
    assert not any("trust_remote_code" in t for t in texts)


# --- (c) listening sockets ---------------------------------------------------------------------
def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening(procs) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of `procs`."""
    out = []
    for p in procs:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_local_ray_listens_on_loopback_only():
    import ray

    from gad_megatron.cluster.runtime import start_ray, stop_ray
    from gad_megatron.config.schema import RunConfig

    t0 = time.monotonic()
    start_ray(RunConfig(num_cpus=1))
    try:
        @ray.remote
        class Probe:  # a worker process with its own gRPC server, as the roles have
            def pid(self) -> int:
                return os.getpid()

        probe = Probe.remote()
        ray.get(probe.pid.remote())
        me = psutil.Process()
        socks = listening([me, *me.children(recursive=True)])
        names = {n for n, _, _ in socks}
        assert {"gcs_server", "raylet"} <= names, socks  # the servers were seen
        assert [s for s in socks if not _loopback(s[1])] == []
        assert not any("dashboard" in n for n in names)  # include_dashboard=False
    finally:
        stop_ray()
    record("local Ray (start_ray): every listening socket", f"{len(socks)} listening sockets "
           f"({', '.join(sorted(names))}), all on 127.0.0.1; no dashboard", time.monotonic() - t0,
           "nothing reachable from other hosts")


_RENDEZVOUS = """
import json, psutil
from gad_megatron.parallel.dist import ParallelLayout, init_distributed
init_distributed(ParallelLayout())
print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN]))
"""


def test_a_local_rank_group_listens_on_loopback_only():
    """Found by the Ray check: torch's rank-0 TCPStore listened on '::' (every interface)
    even with MASTER_ADDR=127.0.0.1; init_distributed now binds it to MASTER_ADDR."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-c", _RENDEZVOUS], capture_output=True, text=True,
                         timeout=300, env=env | {"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    ips = json.loads(res.stdout.strip().splitlines()[-1])
    assert ips and [ip for ip in ips if not _loopback(ip)] == []
    record("a local gloo rank group (torch TCPStore rendezvous)",
           f"{len(ips)} listening sockets, all on 127.0.0.1 (was: the store on '::')", None,
           "nothing reachable from other hosts")


def test_mlflow_ui_as_documented_listens_on_loopback_only(tmp_path):
    """docs/tracking.md tells users `mlflow ui --backend-store-uri sqlite:///...` with no
    --host: its default must stay loopback."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "ui", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine starts it slowly
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        group = psutil.Process(proc.pid)
        socks = listening([group, *group.children(recursive=True)])
        assert any(p == port for _, _, p in socks), socks
        assert [s for s in socks if not _loopback(s[1])] == []
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started, only
        proc.wait(timeout=20)
    record("`mlflow ui` as docs/tracking.md shows it (no --host)",
           f"listens on {sorted({ip for _, ip, _ in socks})} only", None,
           "nothing reachable from other hosts")


# --- (d) secrets -------------------------------------------------------------------------------
SECRETS = {"MLFLOW_TRACKING_TOKEN": "tok-7c1f0e9a55", "MLFLOW_TRACKING_PASSWORD": "pw-93be41d2c8",
           "OPENAI_API_KEY": "sk-judge-4f0a8b6e21", "HF_TOKEN": "hf_2d9e7a61c3"}


def test_a_credential_in_a_config_value_is_refused_unwritten(tmp_path):
    out = tmp_path / "run"
    for uri in ("http://gad:pw-93be41d2c8@127.0.0.1:5000", "http://127.0.0.1:5000/?token=tok-7c1f0e9a55"):
        with pytest.raises(ConfigError) as err:
            load_config("configs/default.yaml", [f"run.out_dir={out}",
                                                 f"tracking.tracking_uri={uri}"])
        assert str(err.value).startswith("tracking.tracking_uri: holds a password or token")
        assert "pw-93be41d2c8" not in str(err.value) and "tok-7c1f0e9a55" not in str(err.value)
    assert not out.exists()
    record("a password or token in tracking.tracking_uri", str(err.value)[:150], None,
           "nothing: refused before the config is written anywhere")


def test_secrets_in_the_environment_reach_no_file_of_a_run(tmp_path, monkeypatch, capfd):
    from gad_megatron.trainer.controller import train

    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    cfg = small_run(tmp_path, "run", "warmup", "train.steps=2", "train.d_only_steps=1",
                    "rollout.max_new_tokens=8", "tracking.samples_every=1")
    train(cfg, backend="inline")
    store = tmp_path / "mlflow.db"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert store in files and (tmp_path / "run" / "config.json") in files
    assert any("mlartifacts" in str(p) for p in files)  # artifacts were written and read here
    leaks = [(str(p), k) for p in files for k, v in SECRETS.items() if v.encode() in p.read_bytes()]
    assert leaks == []
    logged = capfd.readouterr()  # the driver's own output (what a job log would hold)
    assert not any(v in logged.out + logged.err for v in SECRETS.values())
    record("MLflow token/password, judge API key, HF token in the environment of a run",
           f"none of them in any of the {len(files)} files (run directory, MLflow store, "
           f"artifacts)", None, "nothing leaked")


def test_a_judge_server_echoing_the_key_does_not_put_it_in_the_error(monkeypatch):
    from gad_megatron.evaluation import JudgeError, OpenAIJudge
    from tests.test_judge import FakeServer

    key = SECRETS["OPENAI_API_KEY"]
    monkeypatch.setenv("OPENAI_API_KEY", key)
    echo = f'{{"error": "Incorrect API key provided: {key}"}}'.encode()
    for status in (401, 200):  # a refusal, and a 200 that is not a chat completion
        server = FakeServer(default=lambda body, s=status: (s, echo))
        try:
            judge = OpenAIJudge(server.url, "judge", max_retries=0, backoff_s=0)
            with pytest.raises(JudgeError) as err:
                judge.reference("q")
        finally:
            server.close()
        assert server.headers[0]["Authorization"] == f"Bearer {key}"  # the key was sent
        assert key not in str(err.value) and "Incorrect API key provided: ***" in str(err.value)
        assert key not in repr(judge)
    record("a judge endpoint that echoes the API key in its error", str(err.value)[:150], None,
           "nothing: the key is masked in the message")
