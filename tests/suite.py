"""`make test`: every test file in its own pytest process, one after another.

Why not one pytest process for the whole suite: each in-process model build starts
torch.distributed and Megatron's parallel groups, and gloo keeps a few threads per group that
no destroy call gives back. Over ~60 files one process ended up with thousands of threads and
ran the last files several times slower than alone (CI: 78 min, then servers and raylets timed
out at startup). A fresh process per file costs ~5 s of imports and removes that.

After each file the runner also looks for processes the file left behind (Ray workers, gloo
ranks, servers, engine processes). Each is named and killed, so that one file's leak cannot
slow the files after it, and the file counts as failed: leaving nothing behind is part of
what the fault tests assert. The processes of a file carry its own token, so this works
with files running side by side too.

Files run `-j` at a time (default 1, or GAD_TEST_JOBS), longest first. `-j 2` keeps both
cores of the 2-core machine busy (most files spend much of their time starting processes
and waiting on them): 1466 s for 65 files, but two timing-sensitive tests failed under that
load (test_ray_loop's object-store test, test_run_signals' Ctrl-C test), so the default,
which CI runs, stays one file at a time until they are made robust. The order comes from the last run's durations
(`.pytest_cache/gad-suite-durations.json`), else from `SLOW_FIRST`.

    python -m tests.suite [-j N] [FILE ...] [pytest options ...]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILE_TIMEOUT_S = 20 * 60  # no file takes near this alone; a hang must not eat CI's 90 min
TOKEN_VAR = "GAD_TEST_SUITE_TOKEN"
DURATIONS = Path(os.environ.get("GAD_SUITE_DURATIONS",
                               REPO / ".pytest_cache" / "gad-suite-durations.json"))
SLOW_FIRST = ("test_worker_faults.py", "test_save_faults.py", "test_ray_loop.py",
              "test_demo.py", "test_train_parallel.py", "test_run_signals.py",
              "test_vllm_loop.py", "test_vllm_engine.py", "test_compare.py")
"""Files known to take minutes, started first when no durations are recorded (a long file
started last would leave one core idle at the end)."""


@dataclass
class FileResult:
    path: str
    rc: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    tests: list[tuple[float, str]] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.rc in (0, 5) and not self.leftovers  # 5: nothing collected (all deselected)


def _tagged(token: str) -> dict[int, str]:
    """Processes that carry this file's token in their environment, with their command lines.

    The token is inherited by everything a test starts (ranks, servers, Ray's raylet and its
    workers), and by nothing else on the host, so no unrelated process is ever touched."""
    mark = f"{TOKEN_VAR}={token}".encode()
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if mark not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        if cmd.strip():  # not a zombie
            out[int(entry)] = cmd.strip()
    return out


def _reap_leftovers(token: str) -> list[str]:
    """Kill and name the processes a file started that outlived it."""
    time.sleep(1.0)  # let processes that are already exiting finish
    left = _tagged(token)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return [f"pid {p}: {c[:160]}" for p, c in sorted(left.items())]


def _read_junit(path: Path, res: FileResult) -> None:
    if not path.exists():
        return
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        res.tests.append((float(case.get("time", 0.0)), name))
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        kind = kinds[0] if kinds else "passed"
        res.counts[kind] = res.counts.get(kind, 0) + 1
        if kind in ("failure", "error"):
            res.failed.append(f"{name} ({kind})")


def run_file(path: str, args: list[str], workdir: Path) -> FileResult:
    junit = workdir / (Path(path).stem + ".xml")
    token = f"{os.getpid()}-{Path(path).stem}"
    env = dict(os.environ, GAD_TEST_SUITE="1", **{TOKEN_VAR: token})
    cmd = [sys.executable, "-m", "pytest", "-q", path, f"--junitxml={junit}", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=FILE_TIMEOUT_S)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[suite] {path} killed after {FILE_TIMEOUT_S} s\n"
        rc = 124
    res = FileResult(path, rc, time.monotonic() - start, output=output)
    _read_junit(junit, res)
    res.leftovers = _reap_leftovers(token)
    return res


def _line(res: FileResult) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in sorted(res.counts.items())) or "no tests"
    mark = "ok  " if res.ok else "FAIL"
    return f"{mark} {res.path:<44} {res.seconds:7.1f} s  {counts}"


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    files = [a for a in argv if a.endswith(".py") or "::" in a]
    rest = [a for a in argv if a not in files]
    if not files:
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    return files, rest


def _jobs(argv: list[str]) -> tuple[int, list[str]]:
    """(-j N / --jobs N / --jobs=N, else GAD_TEST_JOBS, else 1; the other arguments)."""
    import re

    jobs, rest, i = int(os.environ.get("GAD_TEST_JOBS", "1")), [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-j", "--jobs") and i + 1 < len(argv):
            jobs, i = int(argv[i + 1]), i + 2
            continue
        m = re.fullmatch(r"(?:-j|--jobs=)(\d+)", a)
        if m:
            jobs = int(m.group(1))
        else:
            rest.append(a)
        i += 1
    return max(1, jobs), rest


def _longest_first(files: list[str]) -> list[str]:
    """Recorded durations first; a file never recorded ranks by SLOW_FIRST (minutes) or as
    a middling file (60 s)."""
    try:
        known = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        known = {}
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}

    def guess(f: str) -> float:
        if f in known:
            return known[f]
        return 1000.0 - rank[Path(f).name] if Path(f).name in rank else 60.0
    return sorted(files, key=lambda f: -guess(f))


def _record_durations(results: list[FileResult]) -> None:
    try:
        known = json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        known = {}
    known.update({r.path: round(r.seconds, 1) for r in results})
    try:
        DURATIONS.parent.mkdir(parents=True, exist_ok=True)
        DURATIONS.write_text(json.dumps(known, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only checkout still runs its tests


def main(argv: list[str]) -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    jobs, argv = _jobs(argv)
    files, args = _split(argv)
    if os.environ.get("GAD_RELIABILITY_RESULTS") is None:
        from tests.reliability import RESULTS

        RESULTS.unlink(missing_ok=True)  # the table is made from this run's results only
    results: list[FileResult] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gad-suite-") as tmp, \
            ThreadPoolExecutor(jobs) as pool:
        # Each file is a pytest process of its own; a thread only waits on it.
        pending = [pool.submit(run_file, path, args, Path(tmp))
                   for path in _longest_first(files)]
        for done in as_completed(pending):
            res = done.result()
            results.append(res)
            print(_line(res), flush=True)
            if not res.ok:
                print(res.output[-6000:], flush=True)
                for left in res.leftovers:
                    print(f"     left behind (killed): {left}", flush=True)
    _record_durations(results)
    results.sort(key=lambda r: files.index(r.path))
    return _summary(results, time.monotonic() - start, jobs)


def _summary(results: list[FileResult], seconds: float, jobs: int = 1) -> int:
    total: dict[str, int] = {}
    for r in results:
        for k, n in r.counts.items():
            total[k] = total.get(k, 0) + n
    slowest = sorted((t for r in results for t in r.tests), reverse=True)[:20]
    print("\nslowest tests:")
    for secs, name in slowest:
        print(f"  {secs:7.1f} s  {name}")
    bad = [r for r in results if not r.ok]
    print()
    for r in bad:
        for name in r.failed or ([f"(exit code {r.rc})"] if r.rc not in (0, 5) else []):
            print(f"FAILED {r.path}: {name}")
        for left in r.leftovers:
            print(f"LEFT BEHIND {r.path}: {left}")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(total.items()))
    print(f"{len(results)} files, {counts}, {len(bad)} files failed, in {seconds:.0f} s "
          f"({jobs} at a time)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
