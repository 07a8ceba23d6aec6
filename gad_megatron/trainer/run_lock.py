"""One driver per run directory.

Two drivers on one `run.out_dir` (a job submitted twice, a Slurm requeue that starts while
the old job still shuts down) would both append to `metrics.jsonl`, both save into
`checkpoints/`, prune each other's checkpoints and resume the same MLflow run. The driver
therefore holds an exclusive `flock` on `RUN_DIR/.driver.lock` from before its first write
until it ends. The kernel drops the lock with the process, so a driver killed by -9 or the
OOM killer never blocks its own resume. Only the driver takes it: Ray workers and Slurm
tasks never call `train()`.

The lock file also says who holds it (pid, host, start time), for the one-line refusal.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".driver.lock"


class RunDirError(RuntimeError):
    """The run directory is held by another driver, or cannot be written."""


def _unwritable(run_dir: Path, exc: OSError) -> RunDirError:
    why = exc.strerror or str(exc)
    hint = " (a read-only filesystem)" if exc.errno == errno.EROFS else ""
    return RunDirError(f"run.out_dir={run_dir}: cannot write there{hint}: {why}; choose a "
                       "writable run.out_dir")


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}")
    except (OSError, ValueError, KeyError, UnicodeDecodeError):
        return "a driver that has not yet said who it is"


@contextmanager
def hold_run_dir(run_dir: str | Path):
    """Hold `run_dir` for this process, or raise RunDirError naming the holder."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _unwritable(run_dir, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"run.out_dir={run_dir} is in use by another driver "
                              f"({_holder(fd)}); wait for it to end, or choose another "
                              "run.out_dir") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as exc:
            raise _unwritable(run_dir, exc) from None
        yield
    finally:
        os.close(fd)  # releases the lock
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            # Refused before its first write: leave no run directory that was not there.
            try:
                (run_dir / LOCK_FILE).unlink()
                run_dir.rmdir()
            except OSError:
                pass  # another driver has started there meanwhile
