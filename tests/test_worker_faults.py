"""A worker of each role killed (or stopped) mid-run, through the real driver and Ray: the
driver exits non-zero in bounded time with one line naming role, rank and node, leaves no
process behind, and the rerun of the same command resumes to the uninterrupted numbers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gad_megatron.data.task import write_task
from tests.reliability import record

pytestmark = [pytest.mark.faults, pytest.mark.slow]

WORKER = {"actor": "ray::ActorWorker", "discriminator": "ray::DiscriminatorWorker",
          "reference": "ray::ReferenceWorker", "rollout": "ray::EngineHost"}
COMPARED = ("d/d_loss", "d/score_gap", "g/pg_loss", "g/kl", "g/reward_mean", "g/grad_norm")


def base_args(root: Path) -> list[str]:
    return ["configs/default.yaml", "train.prompts_per_step=4",
            f"data.train_files={root / 'task' / 'train.jsonl'}", "rollout.n=2",
            "model.tiny_hidden=32", "rollout.max_new_tokens=8", "tracking.enabled=false"]


def gad_command(root: Path, run: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gad_megatron", "train", *base_args(root), "--backend", "ray",
            f"run.out_dir={root / run}", "train.stage=gad", f"train.init_from={root / 'warm'}",
            f"train.steps={steps}", "train.save_every=2", "run.num_cpus=8", *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The task and a 2-step warmup run that every gad run here starts from."""
    root = tmp_path_factory.mktemp("faults")
    write_task(root / "task", n_train=64, n_test=8, seed=0)
    subprocess.run([sys.executable, "-m", "gad_megatron", "train", *base_args(root),
                    "--backend", "inline", f"run.out_dir={root / 'warm'}",
                    "train.stage=warmup", "train.steps=2", "train.d_only_steps=1"],
                   check=True, capture_output=True, timeout=300)
    return root


class Driver:
    """The driver in its own process, read line by line."""

    def __init__(self, cmd: list[str]):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: list[str] = []

    def wait_for_step(self, step: int) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("{") and json.loads(line)["step"] == step:
                return
        raise AssertionError("the driver ended early:\n" + self.proc.stderr.read()[-3000:])

    def processes(self):
        import psutil

        return psutil.Process(self.proc.pid).children(recursive=True)

    def worker_pid(self, role: str) -> int:
        found = [p.pid for p in self.processes() if p.cmdline()[:1]
                 and p.cmdline()[0].startswith(WORKER[role])]
        assert found, f"no {WORKER[role]} process among the driver's"
        return found[0]

    def finish(self, timeout: float) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return self.proc.returncode, err


def all_gone(pids: list[int], wait_s: float = 20.0) -> list[int]:
    import psutil

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        left = [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not left:
            return []
        time.sleep(0.5)
    return left


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def kill_and_check(driver: Driver, role: str) -> None:
    """Kill `role`'s worker: the driver fails in < 60 s naming role, rank and node, and no
    process of the job is left."""
    job = [p.pid for p in driver.processes()]
    os.kill(driver.worker_pid(role), signal.SIGKILL)
    killed = time.monotonic()
    rc, err = driver.finish(timeout=120)
    secs = time.monotonic() - killed
    line = error_line(err)
    assert rc == 1 and secs < 60, (rc, secs)
    assert line.startswith(f"error: {role} rank 0 died") and "127.0.0.1" in line, line
    assert all_gone(job) == [], "processes of the job outlived it"
    record(f"kill -9 of the {role} worker mid-run (Ray)", line[:300], secs,
           "the steps after the last checkpoint (every 2 steps here)")


@pytest.mark.parametrize("role", ["discriminator", "reference", "rollout"])
def test_a_killed_worker_fails_the_run_naming_it_and_leaves_nothing(root, role):
    driver = Driver(gad_command(root, f"kill-{role}", 200))
    driver.wait_for_step(2)
    kill_and_check(driver, role)


def test_a_killed_actor_then_the_rerun_resumes_to_the_same_numbers(root):
    driver = Driver(gad_command(root, "resumed", 6))
    driver.wait_for_step(2)  # steps 0-2 done; the checkpoint of step 2 is saved
    kill_and_check(driver, "actor")
    rerun = subprocess.run(gad_command(root, "resumed", 6), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from step 2 (checkpoint" in rerun.stdout
    straight = subprocess.run(gad_command(root, "straight", 6), capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    def logged(run):
        lines = (root / run / "metrics.jsonl").read_text().splitlines()
        return [{k: json.loads(x).get(k) for k in ("step",) + COMPARED} for x in lines]

    assert logged("resumed") == logged("straight")


def test_a_stopped_worker_times_out_naming_the_call(root):
    driver = Driver(gad_command(root, "stopped", 200, "run.worker_timeout_s=15"))
    driver.wait_for_step(2)
    job = [p.pid for p in driver.processes()]
    os.kill(driver.worker_pid("discriminator"), signal.SIGSTOP)
    stopped = time.monotonic()
    rc, err = driver.finish(timeout=120)
    secs = time.monotonic() - stopped
    line = error_line(err)
    assert rc == 1 and secs < 60
    # The call it was waiting for, and where the rank runs.
    assert re.match(r"error: discriminator rank 0 did not answer (scores|bt_step)\(\) within "
                    r"15s .*\(node 127\.0\.0\.1, pid \d+\)", line), line
    assert all_gone(job) == [], "processes of the job outlived it"
    record("SIGSTOP of the discriminator worker (hangs) with run.worker_timeout_s=15", line,
           secs, "the steps after the last checkpoint")
