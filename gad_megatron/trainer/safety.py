"""What keeps a long run from training on garbage or dying without a checkpoint: the count of
skipped (non-finite) updates per role, and the signals that ask for a clean stop."""

from __future__ import annotations

import math
import signal
import threading

from gad_megatron.workers.common import NonFiniteError

ROLES = {"g/": "actor", "d/": "discriminator"}
"""Metric prefix -> the role whose update it reports."""


class SkipGuard:
    """Counts each role's skipped updates (workers skip a step whose loss or gradient is not
    finite, leaving the weights unchanged) and stops the run after `max_consecutive` in a row:
    past that, the role will not recover by itself."""

    def __init__(self, max_consecutive: int, state: dict | None = None):
        self.max_consecutive = max_consecutive
        self.total = {p: 0 for p in ROLES}
        self.streak = {p: 0 for p in ROLES}
        for p, (total, streak) in (state or {}).items():
            self.total[p], self.streak[p] = int(total), int(streak)

    def state_dict(self) -> dict:
        return {p: [self.total[p], self.streak[p]] for p in ROLES}

    def check(self, step: int, metrics: dict) -> None:
        """Add `*/skipped_steps` to the step's metrics; raise after too many in a row."""
        for prefix, role in ROLES.items():
            if f"{prefix}skipped" not in metrics:
                continue  # this role did not update this step (e.g. G in d_only steps)
            if metrics[f"{prefix}skipped"]:
                self.total[prefix] += 1
                self.streak[prefix] += 1
            else:
                self.streak[prefix] = 0
            metrics[f"{prefix}skipped_steps"] = float(self.total[prefix])
            if self.streak[prefix] >= self.max_consecutive:
                last = step - self.streak[prefix]
                raise NonFiniteError(
                    f"{role}: {self.streak[prefix]} consecutive updates skipped at step {step} "
                    f"(train.max_skipped_steps={self.max_consecutive}) because "
                    f"{_what(prefix, metrics)}; "
                    + (f"its last applied update was at step {last}" if last >= 0 else
                       "no update of this call was applied"))


def _what(prefix: str, metrics: dict) -> str:
    kinds = [k for k in ("loss", "grad") if metrics.get(f"{prefix}nonfinite_{k}")]
    bad = [k for k, v in metrics.items() if k.startswith(prefix) and isinstance(v, float)
           and not math.isfinite(v) and not k.endswith("grad_norm")]
    bad.sort(key=lambda k: "loss" not in k)  # the losses first: they are what was skipped
    named = [f"{k}={metrics[k]}" for k in bad]
    what = " and ".join({"loss": "the loss", "grad": "the gradient"}[k] for k in kinds)
    return f"{what or 'a quantity'} is not finite" + (f" ({', '.join(named[:4])})" if named else "")


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's preemption warning, `scancel`) ask the loop to finish the
    current step, save and exit 0; a second one of the same kind is honoured at once by the
    previous handler. Installed only in the main thread (Python's rule for signals).

    SIGINT (Ctrl-C) still stops at once with KeyboardInterrupt, but is also remembered: one
    raised inside a finalizer is lost (the run would train on), and one that
    torch.distributed.checkpoint wraps into its CheckpointException during a save would end
    the run with a traceback instead of "interrupted at step N". The loop calls
    `check_interrupt()` at each step boundary and when a save fails, to raise it again. A
    SIGINT this process inherited as ignored (a background job) stays ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self.interrupted = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # asked twice: stop now, as without this handler
            previous = self._previous.get(signum)
            signal.signal(signum, previous if callable(previous) else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        print(f"{self.received} received: finishing the current step, then saving a "
              "checkpoint", flush=True)

    def _interrupt(self, signum, frame) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def check_interrupt(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C came and its first raise was swallowed."""
        if self.interrupted:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
