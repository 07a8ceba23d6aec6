"""No process of a run outlives the process that started it.

Megatron's torch_dist writer forks one child per write bucket on every save
(`FileSystemWriterAsync.write_preloaded_data_multiproc`, fork context). When the trainer is
killed (-9, the OOM killer, a preempted node) while they run, a child can be left blocked for
good on a queue lock the dead parent held, keeping the run's files and multiprocessing's
resource_tracker open. Two things close that without patching Megatron:

- `die_with_parent()`: the kernel sends the child SIGKILL when its parent dies
  (`PR_SET_PDEATHSIG`), and a parent already gone by then is caught by its pid.
- `guard_forked_children()`: every later `os.fork` of this process (Megatron's included)
  runs `die_with_parent()` in the child and gives it the default SIGTERM/SIGUSR1 handlers,
  so a forked writer does not inherit the trainer's "save and exit" handler and ignore a
  plain `kill`.

`subprocess` and the spawn context exec a new program without running Python's at-fork
hooks; those children (Ray, servers, spawned ranks) are watched by the code that starts them.
`PR_SET_PDEATHSIG` follows the parent *thread*: a fork from a short-lived thread would lose
its child when that thread ends. Megatron's writers fork from the saving thread, which lives
as long as the trainer.
"""

from __future__ import annotations

import os
import signal
import sys

RESET_IN_CHILD = (signal.SIGTERM, signal.SIGUSR1)
"""The trainer's stop signals (`trainer.safety.StopSignals`): a forked child gets the default
action back, so SIGTERM ends it."""

_PR_SET_PDEATHSIG = 1
_state = {"installed": False, "parent": None}


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies; exit now if the parent
    (`parent_pid`, when given) is already gone. False where there is no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died between the fork and the prctl: no signal will come
    return True


def _before_fork() -> None:
    _state["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    for sig in RESET_IN_CHILD:
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (ValueError, OSError):  # not the main thread of the main interpreter
            pass
    die_with_parent(_state["parent"])


def guard_forked_children() -> None:
    """Install the at-fork hooks once per process (idempotent; a forked child inherits them)."""
    if _state["installed"]:
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _state["installed"] = True
