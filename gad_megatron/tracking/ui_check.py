"""A documented check that `mlflow ui` opens a job's experiment on the training view.

    python -m gad_megatron.tracking.ui_check --store sqlite:///runs/demo/mlflow.db \
        --out docs/img/mlflow_runs.png

Starts `mlflow ui` on 127.0.0.1 (a free port) over the store, loads the address that `make
demo` prints (`tracker.runs_page`) in headless Chromium (Debian's `chromium` package), saves
a screenshot, and fails unless the rendered page shows the experiment's runs by name (the
Runs table; nested runs start collapsed under their parent), which the GenAI view (traces)
does not. Needs Chromium; `make test` does not
run it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _wait_for(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow ui did not answer at {url}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.5)


def _chromium(*args: str, timeout_s: float = 120) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="gad-ui-check-") as profile:
        res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                              "--window-size=1400,900", *args],
                             capture_output=True, text=True, timeout=timeout_s)
    return res.stdout


def check(store: str, out: Path, run_names: list[str] | None = None) -> str:
    """Screenshot of the first run's experiment page; returns the page's address. Raises
    unless every run name in `run_names` (default: the experiment's runs) is on it."""
    from mlflow.tracking import MlflowClient

    from gad_megatron.parallel.launch import free_port
    from gad_megatron.tracking.tracker import runs_page

    client = MlflowClient(tracking_uri=store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    if not runs:
        raise RuntimeError(f"{store}: no runs to show")
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "ui", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", store],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(f"{ui}/health", proc, 300)
        page = runs_page(store, runs[0].info.run_id, ui)
        out.parent.mkdir(parents=True, exist_ok=True)
        _chromium(f"--screenshot={out}", page)
        dom = _chromium("--dump-dom", page)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    same = [r for r in runs if r.info.experiment_id == runs[0].info.experiment_id]
    # Nested runs (gad under its warmup) start collapsed: the top-level ones must show.
    names = run_names or [r.info.run_name for r in same
                          if "mlflow.parentRunId" not in r.data.tags]
    missing = [n for n in names if n not in dom]
    if missing or not out.is_file():
        raise RuntimeError(f"{page}: the runs {missing} are not on the page (not the "
                           f"training view?); screenshot: {out}")
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="MLflow tracking URI (sqlite:///...)")
    p.add_argument("--out", default="mlflow_runs.png", help="screenshot file")
    args = p.parse_args(argv)
    page = check(args.store, Path(args.out))
    print(f"ok: {page} shows the runs; screenshot {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
