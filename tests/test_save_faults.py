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

# The child trains, and kills itself (SIGKILL, as `kill -9` would) just before the k-th file
# operation of its second save: each worker's save, every rename, every removal.
CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.insert(0, os.getcwd())
    from gad_megatron.trainer import checkpoints, controller
    from gad_megatron.workers.discriminator import DiscriminatorWorker
    from gad_megatron.workers.policy import ActorWorker
    from tests.tiny_models import small_run

    kill_at, state = int(sys.argv[2]), {"save": 0, "event": 0}

    def event(name):
        if state["save"] == 2:
            state["event"] += 1
            print("EVENT", state["event"], name, flush=True)
            if state["event"] == kill_at:
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
    checkpoints.os.replace = watched("replace", os.replace)
    checkpoints.shutil.rmtree = watched("rmtree", shutil.rmtree)
    ActorWorker.save = watched("actor save", ActorWorker.save)
    DiscriminatorWorker.save = watched("discriminator save", DiscriminatorWorker.save)
    if __name__ == "__main__":
        args = sys.argv[3:]
        controller.train(small_run(__import__("pathlib").Path(sys.argv[1]), "run", "warmup",
                                   *args), backend="inline")
""")


def child_env() -> dict:
    # This process's own single-rank group keeps its port: the child must choose its own.
    import os

    return {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK",
                                                              "WORLD_SIZE", "LOCAL_RANK")}


def no_process_left(session: int, wait_s: float = 10.0) -> bool:
    """Whether every process of `session` is gone (within `wait_s`)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == session]
        if not left:
            return True
        time.sleep(0.5)
    for p in left:
        p.kill()
    return False


def _sid(pid: int) -> int | None:
    import os

    try:
        return os.getsid(pid)
    except OSError:
        return None


def comparable(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(x).get(k) for k in ("step",) + COMPARED} for x in lines]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    base = tmp_path_factory.mktemp("straight")
    train(small_run(base, "run", "warmup", *ARGS), backend="inline")
    return comparable(base / "run")


def test_a_driver_killed_before_any_file_operation_of_a_save_loses_nothing(tmp_path, straight):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    kills = []
    for k in range(1, 30):
        work = tmp_path / f"k{k}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        with open(work / "out.txt", "w") as out:
            # Its own session, so that whatever it spawned can be found after its death.
            child = subprocess.Popen([sys.executable, str(script), str(work), str(k), *ARGS],
                                     stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True)
            rc = child.wait(timeout=300)
        text = (work / "out.txt").read_text()
        events = [ln for ln in text.splitlines() if ln.startswith("EVENT")]
        if rc == 0:  # k is past the last operation: the save completed
            assert len(events) == k - 1 and k > 5
            break
        assert rc == -9, text[-2000:]
        assert no_process_left(child.pid), "a process of the killed driver lives on"
        where = events[-1].split(" ", 2)[2]
        ckpt = find_resume(work / "run")  # never an error: a complete one is always current
        assert ckpt is not None and problem_with(ckpt) is None, where
        assert ckpt.name in ("step_0000002", "step_0000004"), where
        t0 = time.monotonic()
        train(small_run(work, "run", "warmup", *ARGS), backend="inline")  # the rerun
        assert comparable(work / "run") == straight, where
        kills.append((where, ckpt.name, time.monotonic() - t0))
    assert len(kills) >= 5
    for where, name, secs in kills:
        record(f"kill -9 of the driver before `{where.strip()}` of a save",
               f"the rerun resumes from {name} and ends with the uninterrupted run's metrics",
               None, "the steps after that checkpoint (redone)")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for one checkpoint of the tiny model, not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


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
