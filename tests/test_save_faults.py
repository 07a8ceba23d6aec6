"""Faults during a checkpoint save: the driver killed (-9) before each of the save's file
operations in turn, and a full disk. Each leaves a complete checkpoint current, nothing
partial that passes for complete, and a rerun that ends with the same numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gad_megatron.checkpoint.megatron_ckpt import CheckpointError
from gad_megatron.trainer.checkpoints import find_resume, problem_with
from gad_megatron.trainer.controller import train
from tests.reliability import record
from tests.tiny_models import small_run

pytestmark = pytest.mark.faults

ARGS = ("train.steps=4", "train.d_only_steps=1", "train.save_every=2", "train.keep_last=1",
        "rollout.max_new_tokens=8", "tracking.enabled=false")
COMPARED = ("d/d_loss", "d/score_gap", "g/sft_loss", "g/grad_norm", "d/grad_norm")

# The driver trains, and kills itself (SIGKILL, as `kill -9` would) at the k-th event of its
# second save: before each worker's save, every rename, every removal, or just after Megatron
# forked a shard writer. Each driver is forked from a zygote that imported everything once
# (the imports are half of a tiny run's time); a forked driver is a process of its own, in a
# session of its own, exactly as killable as one started from the shell.
CHILD = textwrap.dedent("""
    import os, shutil, signal, sys, traceback
    sys.path.insert(0, os.getcwd())
    from pathlib import Path
    from gad_megatron.trainer import checkpoints, controller
    from gad_megatron.workers.discriminator import DiscriminatorWorker
    from gad_megatron.workers.policy import ActorWorker
    from tests.tiny_models import small_run

    state = {"save": 0, "event": 0, "kill_at": 0}

    def event(name):
        if state["save"] == 2:
            state["event"] += 1
            print("EVENT", state["event"], name, flush=True)
            if state["event"] == state["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)

    def watched(name, fn):
        def call(*args, **kwargs):
            event(f"{name} {os.path.basename(str(args[0])) if name in ('replace', 'rmtree') else ''}")
            return fn(*args, **kwargs)
        return call

    real_save = checkpoints.save_checkpoint
    def save(*args, **kwargs):
        state["save"] += 1
        return real_save(*args, **kwargs)

    controller.save_checkpoint = save
    # Megatron forks shard writers inside each worker's save: killing the driver just after
    # such a fork leaves them running, which is where an orphan could hang (issue 29). (The
    # zygote's own forks come before any save, so they are no events.)
    os.register_at_fork(after_in_parent=lambda: event("fork of a shard writer"))
    checkpoints.os.replace = watched("replace", os.replace)
    checkpoints.shutil.rmtree = watched("rmtree", shutil.rmtree)
    ActorWorker.save = watched("actor save", ActorWorker.save)
    DiscriminatorWorker.save = watched("discriminator save", DiscriminatorWorker.save)

    def drive(work, kill_at, args):
        \"\"\"The driver's process: its output in WORK/out.txt, then the training run.\"\"\"
        os.setsid()
        out = os.open(os.path.join(work, "out.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        state["kill_at"] = kill_at
        code = 0
        try:
            controller.train(small_run(Path(work), "run", "warmup", *args), backend="inline")
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    if __name__ == "__main__":
        # One line of stdin per driver ("WORK KILL_AT"); one line back: "PID EXIT_CODE".
        for line in sys.stdin:
            work, kill_at = line.split()
            pid = os.fork()
            if pid == 0:
                drive(work, int(kill_at), sys.argv[1:])
            print(pid, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
""")


def child_env() -> dict:
    # This process's own single-rank group keeps its port: the child must choose its own.
    import os

    return {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK",
                                                              "WORLD_SIZE", "LOCAL_RANK")}


def left_of(session: int, wait_s: float = 10.0) -> list[str]:
    """The processes of `session` still alive after `wait_s` (killed, then named)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = [p for p in psutil.process_iter(["pid", "cmdline"]) if _sid(p.pid) == session]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p in left:
        p.kill()
    return [f"pid {p.pid}: {' '.join(p.info['cmdline'] or [])[:120]}" for p in left]


def holders_of(root: Path) -> list[str]:
    """Processes, of any session, that hold a file under `root` open."""
    import os

    held = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            held += [f"pid {pid}: {t}" for t in (os.readlink(f"/proc/{pid}/fd/{fd}")
                                                 for fd in fds) if t.startswith(str(root))]
        except OSError:
            continue
    return held


def _sid(pid: int) -> int | None:
    import os

    try:
        return os.getsid(pid)
    except OSError:
        return None


class Drivers:
    """The zygote (CHILD) that forks one training driver per `run`."""

    def __init__(self, script: Path):
        self.proc = subprocess.Popen([sys.executable, str(script), *ARGS], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=child_env())

    def run(self, work: Path, kill_at: int) -> tuple[int, str, list[str], list[str]]:
        """A driver, killed at its `kill_at`-th event of the second save (0: never): its exit
        code, output, the events it reached, and whatever of it is left 10 s on."""
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        self.proc.stdin.write(f"{work} {kill_at}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert len(answer) == 2, f"the zygote died (exit code {self.proc.poll()})"
        pid, rc = map(int, answer)
        text = (work / "out.txt").read_text()
        left = left_of(pid) + holders_of(work)
        events = [ln.split(" ", 2)[2] for ln in text.splitlines() if ln.startswith("EVENT")]
        return rc, text, events, left

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def kill_points(events: list[str]) -> list[int]:
    """Every file operation of the save, and the first shard-writer fork of each worker's
    save (a writer per bucket: the first is where the driver dies with a writer running)."""
    points, prev = [], ""
    for k, name in enumerate(events, start=1):
        if not name.startswith("fork") or not prev.startswith("fork"):
            points.append(k)
        prev = name
    return points


def comparable(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(x).get(k) for k in ("step",) + COMPARED} for x in lines]


@pytest.mark.slow  # ~20 training runs: in `make test-all` (CI), not in the quick `make test`
def test_a_driver_killed_at_any_step_of_a_save_loses_nothing_and_leaves_nothing(tmp_path):
    """kill -9 of the driver before each file operation of a save, and just after Megatron
    forked a shard writer: no process of it (writers, resource_tracker) lives 10 s on, no
    process holds a file of the run, a complete checkpoint is current, and the rerun ends
    with the numbers of a run never killed."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    drivers = Drivers(script)
    try:
        kills = _kill_at_every_point(drivers, tmp_path)
    finally:
        drivers.close()
    for where, name in kills:
        what = ("just after Megatron forked a shard writer in" if where.startswith("fork")
                else f"before `{where.strip()}` of")
        record(f"kill -9 of the driver {what} a save",
               f"the rerun resumes from {name} and ends with the uninterrupted run's "
               "metrics; no process of the driver is left 10 s on",
               None, "the steps after that checkpoint (redone)")


def _kill_at_every_point(drivers: Drivers, tmp_path: Path) -> list[tuple[str, str]]:
    rc, text, events, left = drivers.run(tmp_path / "straight", 0)
    assert rc == 0 and not left, (text[-2000:], left)
    straight = comparable(tmp_path / "straight" / "run")
    points = kill_points(events)
    assert len(points) > 5 and sum(e.startswith("fork") for e in events) >= 2, events
    kills = []
    for k in points:
        work = tmp_path / f"k{k}"
        rc, text, reached, left = drivers.run(work, k)
        assert rc == -9 and len(reached) == k, text[-2000:]
        where = reached[-1]
        assert not left, f"after a kill -9 {where}, left alive or holding files: {left}"
        ckpt = find_resume(work / "run")  # never an error: a complete one is always current
        assert ckpt is not None and problem_with(ckpt) is None, where
        assert ckpt.name in ("step_0000002", "step_0000004"), where
        train(small_run(work, "run", "warmup", *ARGS), backend="inline")  # the rerun
        assert comparable(work / "run") == straight, where
        kills.append((where, ckpt.name))
    return kills


# A process that forks a child the way Megatron's writer does, then dies by SIGKILL. Its
# SIGTERM handler ignores the signal, as the trainer's "save and exit" handler would.
FORKS_AND_DIES = textwrap.dedent("""
    import multiprocessing as mp, os, signal, sys, time
    from gad_megatron.parallel.orphans import guard_forked_children

    def child(report):
        with open(report, "w") as f:
            f.write(f"{os.getpid()} {signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}")
        time.sleep(120)

    if __name__ == "__main__":
        if sys.argv[1] == "guarded":
            guard_forked_children()
        signal.signal(signal.SIGTERM, lambda *a: None)
        writer = mp.get_context("fork").Process(target=child, args=(sys.argv[2],))
        writer.start()
        while not os.path.getsize(sys.argv[2]) if os.path.exists(sys.argv[2]) else True:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("mode", ["guarded", "unguarded"])
def test_a_forked_writer_dies_with_its_parent_and_answers_sigterm(tmp_path, mode):
    import psutil

    report = tmp_path / "report"
    # No pipes: an orphan holding one would keep this call waiting.
    rc = subprocess.run([sys.executable, "-c", FORKS_AND_DIES, mode, str(report)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60).returncode
    assert rc == -9
    pid, default_sigterm = report.read_text().split()
    try:
        orphan = psutil.Process(int(pid))
        alive = orphan.status() != psutil.STATUS_ZOMBIE and not psutil.wait_procs([orphan], 5)[0]
    except psutil.NoSuchProcess:
        alive = False
    if mode == "unguarded":  # the hazard is real: without the guard the orphan lives on
        assert alive and default_sigterm == "False"
        orphan.kill()
    else:
        assert not alive, "the forked child outlived its parent"
        assert default_sigterm == "True", "the child kept the parent's SIGTERM handler"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for one checkpoint of the tiny model, not two."""
    from tests.tmpfs import tmpfs

    with tmpfs(tmp_path / "disk", "4m") as mnt:
        yield mnt


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(
        tmp_path, small_disk):
    task_cfg = small_run(tmp_path, "unused", "warmup")  # writes the task files under tmp_path
    del task_cfg
    args = ("train.steps=8", "train.d_only_steps=1", "train.save_every=2", "train.keep_last=5",
            "rollout.max_new_tokens=8", "tracking.enabled=false",
            f"data.train_files={tmp_path / 'task' / 'train.jsonl'}")
    cfg = small_run(small_disk, "run", "warmup", *args)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        train(cfg, backend="inline")
    secs = time.monotonic() - t0
    msg = str(err.value)
    assert msg.startswith("disk full while saving step_") and "MiB free on the device" in msg
    root = small_disk / "run" / "checkpoints"
    latest = find_resume(small_disk / "run")
    assert latest is not None and problem_with(latest) is None
    assert f"the latest checkpoint is still {latest.name}" in msg
    assert not list(root.glob(".*partial")), "a partial save was left behind"
    record("a full disk (4 MiB tmpfs) during a checkpoint save", msg, secs,
           f"the steps after {latest.name}; the partial save is removed")


def test_a_full_disk_is_recognised_by_errno_by_text_or_by_free_space(tmp_path):
    """Each way a full disk reaches the save names the device's free space; an error that is
    not a full disk (plenty of room, no ENOSPC) is left alone."""
    import errno

    from gad_megatron.trainer.checkpoints import _disk_full
    root = tmp_path / "run" / "checkpoints"  # not made yet: the free space of tmp_path counts
    by_errno = RuntimeError("writer failed")
    by_errno.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    for exc in (by_errno, RuntimeError("[Errno 28] No space left on device: 'x.distcp'")):
        why = _disk_full(exc, root)
        assert why.startswith("No space left on device; ") and "MiB free on the device" in why
    # no checkpoint yet: 1 MiB is the need, and this tmp dir has more than that free
    assert _disk_full(RuntimeError("unexpected pos 1234"), root) is None
