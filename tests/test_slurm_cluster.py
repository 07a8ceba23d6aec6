"""slurm/gad.sbatch on a real two-node Slurm cluster (tests/slurm_cluster.py): `sbatch -N2`
of the real script on the tiny embedded default, its failure paths and preemption.

Marked `cluster`: `make test` leaves these out, `make test-cluster` runs them (after
slurm/ci/install.sh). Every job talks on loopback only (nodes at 127.0.0.2 and 127.0.0.3).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import NODES, LocalSlurm, free_port, have_slurm, job_processes

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "gad.sbatch"
JOB_TIMEOUT_S = 420  # one job under a loaded 2-core CI machine; typically 50-90 s
WAIT_S = 120  # the script's node-registration timeout (a loaded 2-core machine is slow)
NOREG_WAIT_S = 40  # ... in the test of a node that never registers
ADDRS = set(NODES.values())
# The embedded default's warmup, 3 steps; D and G are both updated from step 0 (a resume
# from a checkpoint taken before the actor's first update is a separate case).
WARMUP = ["train.steps=3", "train.d_only_steps=0"]
WORKER_LINE = re.compile(r"^worker (\w+) rank (\d+) on node (\S+) \(pid (\d+)\)", re.M)


def _free_range(width: int) -> int:
    """A base port with `width` ports above it free on loopback (Ray binds them all)."""
    for _ in range(50):
        base = random.randrange(20000, 29000)
        try:
            for port in range(base, base + width, 97):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not have_slurm():
        pytest.fail("Slurm/MUNGE not installed: run slurm/ci/install.sh (make test-cluster does)")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        assert cluster.alive() == {}, "a Slurm daemon outlived stop()"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Task files of the embedded default, and a place for runs and logs."""
    root = tmp_path_factory.mktemp("jobs")
    subprocess.run([sys.executable, "-m", "gad_megatron", "data", "make-task",
                    "--out", str(root / "task")], check=True, cwd=REPO, capture_output=True)
    (root / "logs").mkdir()
    return root


class Job:
    def __init__(self, slurm: LocalSlurm, job_id: str, log: Path, run_dir: Path):
        self.slurm, self.id, self.log, self.run_dir = slurm, job_id, log, run_dir

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout_s: float = JOB_TIMEOUT_S, **kw) -> dict:
        return self.slurm.wait_job(self.id, timeout_s, **kw)

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.strip()]

    def wait_for_step(self, step: int, timeout_s: float = JOB_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(m["step"] >= step for m in self.metrics()):
                return
            if self.slurm.job(self.id).get("JobState") not in ("PENDING", "RUNNING"):
                raise AssertionError(f"job ended before step {step}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no step {step} within {timeout_s:g}s:\n{self.text()[-3000:]}")

    def workers(self) -> dict[tuple[str, int], tuple[str, int]]:
        """(role, rank) -> (node address, pid), as the driver reported them."""
        return {(r, int(k)): (a, int(p)) for r, k, a, p in WORKER_LINE.findall(self.text())}


def submit(slurm: LocalSlurm, work: Path, name: str, stage: str, overrides: list[str],
           config: str = "configs/default.yaml", env: dict | None = None) -> Job:
    run_dir = work / "runs" / name
    log = work / "logs" / f"{name}.out"
    base = _free_range(2300)
    job_env = {
        "GAD_PYTHON": sys.executable, "PYTHONPATH": str(REPO), "GAD_REPO": str(REPO),
        "GAD_CPUS_PER_NODE": "2", "GAD_SOCKET_IFNAME": "lo", "GAD_LOG_DIR": str(work / "logs"),
        "GAD_RAY_PORT": str(free_port()), "GAD_RAY_NODE_PORTS": str(base),
        "GAD_RAY_WORKER_PORTS": str(base + 10), "GAD_RAY_PORT_STRIDE": "1100",
        "GAD_RAY_WAIT_S": str(WAIT_S), **(env or {})}
    task = work / "task"
    args = ["-N2", f"--output={log}", "--time=15", f"--job-name={name}", str(SCRIPT), stage,
            config, f"run.out_dir={run_dir}", f"data.train_files={task / 'train.jsonl'}",
            f"data.eval_files={task / 'test.jsonl'}", *overrides]
    return Job(slurm, slurm.sbatch(args, env=job_env, cwd=str(REPO)), log, run_dir)


def comparable(metrics: list[dict]) -> list[dict]:
    """Metrics without wall-clock figures (those differ between any two runs)."""
    return [{k: v for k, v in m.items() if not k.startswith("time/") and "per_s" not in k}
            for m in metrics]


def mlflow_runs(run_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def assert_no_job_processes(job: Job) -> None:
    left = job_processes(job.id)
    assert left == [], f"processes of job {job.id} left: {left}"


@pytest.fixture(scope="module")
def warmup(slurm, work):
    job = submit(slurm, work, "warmup", "warmup", WARMUP)
    info = job.wait()
    return job, info


def test_two_node_warmup(warmup):
    job, info = warmup
    log = job.text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    # How it started and ended.
    assert f"gad-slurm: job {job.id} start (restart 0): stage warmup" in log
    assert "n1=127.0.0.2 n2=127.0.0.3" in log
    assert "Ray cluster up: 2 node(s) registered" in log
    assert "gad-slurm: driver exited with code 0" in log
    # The other node's Ray first, then the head's.
    assert 0 < log.index("gad-slurm: Ray stopped on n2") < log.index("gad-slurm: Ray stopped on n1")
    assert f"gad-slurm: job {job.id} end: exit code 0" in log
    # Ray saw two nodes, at the two addresses Slurm has for them.
    seen = json.loads((job.log.parent / f"gad-ray-{job.id}-0-nodes.json").read_text())
    assert sorted(n["address"] for n in seen["nodes"]) == sorted(ADDRS)
    # Workers of at least two roles ran on different nodes (their own reported address).
    workers = job.workers()
    assert {r for r, _ in workers} == {"actor", "discriminator", "rollout"}
    assert {a for a, _ in workers.values()} == ADDRS
    # The run directory and MLflow hold the run.
    steps = [m["step"] for m in job.metrics()]
    assert steps == [0, 1, 2]
    assert all("g/sft_loss" in m and "d/d_loss" in m for m in job.metrics())
    assert (job.run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    runs = [r for r in mlflow_runs(job.run_dir) if r.data.tags.get("gad.stage") == "warmup"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "d/d_loss" in runs[0].data.metrics
    assert_no_job_processes(job)


def test_two_node_gad_after_warmup(slurm, work, warmup):
    job = submit(slurm, work, "gad", "gad", ["train.steps=3",
                                             f"train.init_from={warmup[0].run_dir}"],
                 config="configs/default_gad.yaml")
    info = job.wait()
    log = job.text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert [m["step"] for m in job.metrics()] == [0, 1, 2]
    assert all("g/kl" in m for m in job.metrics())
    workers = job.workers()
    assert {r for r, _ in workers} == {"actor", "discriminator", "reference", "rollout"}
    assert {a for a, _ in workers.values()} == ADDRS
    runs = {r.data.tags.get("gad.stage"): r for r in mlflow_runs(job.run_dir)}
    assert runs["gad"].info.status == "FINISHED"
    assert runs["gad"].data.tags.get("mlflow.parentRunId") == runs["warmup"].info.run_id
    assert_no_job_processes(job)


def _ray_start_pid(job_id: str, node: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid, where, cmd in job_processes(job_id):
            if where == node and "ray.scripts.scripts start" in cmd:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no `ray start` of job {job_id} on {node} within {timeout_s:g}s")


def test_node_that_never_registers_fails_the_job_naming_it(slurm, work):
    job = submit(slurm, work, "noreg", "warmup", ["train.steps=3"],
                 env={"GAD_RAY_WAIT_S": str(NOREG_WAIT_S)})
    # Freeze node 2's `ray start` before it can start its raylet: it never registers (and
    # never exits, so only the timeout can catch it). Slurm's cancel sends SIGCONT first.
    pid = _ray_start_pid(job.id, "n2", 120)
    os.kill(pid, signal.SIGSTOP)
    info = job.wait()
    log = job.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log[-3000:]
    error = re.search(r"^(\d\d:\d\d:\d\d) gad-slurm: error: Ray nodes not registered "
                      rf"within {NOREG_WAIT_S}s: n2 \(127\.0\.0\.3\)$", log, re.M)
    assert error, log[-3000:]
    start = re.search(r"^(\d\d:\d\d:\d\d) gad-slurm: job \d+ start", log, re.M)
    # Declared at the stated timeout (counted from the job's start; a few seconds more for the
    # node check's own exit on a loaded machine), and n1 not blamed.
    assert _seconds(error.group(1)) - _seconds(start.group(1)) <= NOREG_WAIT_S + 8
    assert "gad-slurm: driver on" not in log  # the driver never started
    assert "gad-slurm: Ray stopped on n2" in log  # the frozen node's Ray was ended too
    assert_no_job_processes(job)


def _seconds(hms: str) -> int:
    h, m, s = map(int, hms.split(":"))
    return 3600 * h + 60 * m + s


def test_worker_killed_on_node2_fails_naming_role_and_rank(slurm, work):
    job = submit(slurm, work, "kill", "warmup", ["train.steps=200"])
    job.wait_for_step(0)
    on_n2 = [(role, rank, pid) for (role, rank), (addr, pid) in job.workers().items()
             if addr == NODES["n2"]]
    assert on_n2, job.workers()
    role, rank, pid = on_n2[0]
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"SLURMD_NODENAME=n2" in env and f"SLURM_JOB_ID={job.id}".encode() in env
    os.kill(pid, signal.SIGKILL)
    info = job.wait()
    log = job.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log[-3000:]
    assert re.search(rf"error: {role} rank {rank} died", log), log[-3000:]
    assert "gad-slurm: driver exited with code 1" in log
    assert "gad-slurm: Ray stopped on" in log
    assert len(job.metrics()) < 200
    assert_no_job_processes(job)


def test_preemption_saves_requeues_and_resumes_bitwise(slurm, work, warmup):
    script = SCRIPT.read_text()
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script
    job = submit(slurm, work, "preempt", "warmup", WARMUP)
    job.wait_for_step(0)
    # What Slurm sends 120 s before the time limit, sent now: USR1 to the batch shell only.
    res = slurm.run(["scancel", "--batch", "--signal=USR1", job.id])
    assert res.returncode == 0, res.stderr
    info = job.wait(done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"))
    log = job.text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert info["Restarts"] == "1"
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+); checkpoint step \1 saved", log)
    assert stopped, log[-4000:]
    at = int(stopped.group(1))
    assert 1 <= at < 3, f"the signal came too late to test a resume (step {at})"
    assert "gad-slurm: driver exited with code 0 (after SIGUSR1)" in log
    assert f"gad-slurm: requeueing job {job.id}" in log
    assert f"gad-slurm: job {job.id} start (restart 1)" in log
    assert re.search(rf"resuming from step {at} \(checkpoint .*step_{at:07d}\)", log)
    # The resumed run ends where an uninterrupted one does, with the same numbers.
    assert comparable(job.metrics()) == comparable(warmup[0].metrics())
    runs = [r for r in mlflow_runs(job.run_dir) if r.data.tags.get("gad.stage") == "warmup"
            and r.data.tags.get("gad.run_dir") == str(job.run_dir)]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run goes on
    assert_no_job_processes(job)


def test_make_target_submits_and_prints_job_and_log(slurm, work):
    venv = Path(sys.executable).parent.parent
    run_root = work / "make-runs"
    # -o: neither the venv setup nor the task files are remade (both exist for this test).
    argv = ["make", "-s", "-o", str(venv / ".setup-stamp"), "-o", "task", "warmup", "SLURM=1",
            "NODES=2", "PARTITION=ci", f"VENV={venv}", f"RUN_ROOT={run_root}",
            "SBATCH_ARGS=--time=5", "train.steps=1",
            f"data.train_files={work / 'task' / 'train.jsonl'}"]
    res = slurm.run(argv, cwd=str(REPO), env={"GAD_RAY_PORT": str(free_port())})
    assert res.returncode == 0, res.stdout + res.stderr
    said = re.search(r"^submitted warmup as Slurm job (\d+) on 2 node\(s\); log: (\S+)$",
                     res.stdout, re.M)
    assert said, res.stdout
    job_id, log = said.groups()
    assert log == f"{run_root}/logs/warmup-{job_id}.out"
    info = slurm.job(job_id)
    assert info["NumNodes"].split("-")[0] == "2" and info["Partition"] == "ci"
    assert info["Command"] == str(SCRIPT) or info["Command"].endswith("slurm/gad.sbatch")
    assert info["StdOut"] == log
    slurm.run(["scancel", job_id])
    slurm.wait_job(job_id, 120)
    deadline = time.monotonic() + 30
    while job_processes(job_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_processes(job_id) == []
