"""`make test`, `make test-all`: the test files in pytest processes of their own, `-j` at once.

Why not one pytest process for the whole suite: each in-process model build starts
torch.distributed and Megatron's parallel groups, and gloo keeps a few threads per group that
no destroy call gives back. Over ~60 files one process ended up with thousands of threads and
ran the last files several times slower than alone (CI: 78 min, then servers and raylets timed
out at startup). Why not a process per file either: each costs ~5 s of imports (torch,
Megatron, transformers), which over ~70 files was 6 minutes of the suite. So a file known to
take long (SLOW_FIRST, or a recorded duration over HEAVY_S) has a process of its own, and the
others share one, up to BATCH_FILES of them: few enough model builds per process that the
threads never pile up.

After each process the runner also looks for processes it left behind (Ray workers, gloo
ranks, servers, engine processes). Each is named and killed, so that one leak cannot slow
the files after it, and the files of that process count as failed: leaving nothing behind
is part of what the fault tests assert. The processes of a pytest process carry its own
token, so this works with processes running side by side too.

Processes run `-j` at a time (GAD_TEST_JOBS, default 2: both cores of the 2-core machine,
since most files spend much of their time starting processes and waiting on them), longest
first. The order comes from the last run's durations (`.pytest_cache/gad-suite-durations.json`),
else from `SLOW_FIRST`.

    python -m tests.suite [-j N] [--batch N] [FILE ...] [pytest options ...]
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
FILE_TIMEOUT_S = 20 * 60  # per pytest process, batched or alone; a hang must not eat CI's 90 min
TOKEN_VAR = "GAD_TEST_SUITE_TOKEN"
DURATIONS = Path(os.environ.get("GAD_SUITE_DURATIONS",
                               REPO / ".pytest_cache" / "gad-suite-durations.json"))
SLOW_FIRST = ("test_save_faults.py", "test_worker_faults.py", "test_ray_loop.py",
              "test_vllm_loop.py", "test_demo.py", "test_vllm_engine.py", "test_run_signals.py",
              "test_train_parallel.py", "test_resume_reshard.py", "test_loop_inline.py",
              "test_resume.py", "test_convert.py", "test_parity.py", "test_compare.py",
              "test_security.py", "test_packing.py", "test_cluster_ray.py", "test_export.py",
              "test_tracking_spool.py")
"""Files known to take minutes, longest first: each runs in a process of its own, started
first when no durations are recorded (a long file started last would leave one core idle at
the end)."""
HEAVY_S = 40.0
"""A file recorded at more than this many seconds runs alone, as SLOW_FIRST's do."""
BATCH_FILES = 8
"""At most this many of the other files share a pytest process (`--batch N` to change)."""
LIGHT_GUESS_S = 15.0
"""The guess for a file with no recorded duration that is not in SLOW_FIRST."""


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
    shared_with: int = 0  # how many other files ran in the same pytest process

    @property
    def ok(self) -> bool:
        return self.rc in (0, 5) and not self.leftovers  # 5: nothing collected (all deselected)


def _tagged(token: str) -> dict[int, str]:
    """Processes that carry this token in their environment, with their command lines.

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
    """Kill and name the processes a pytest process started that outlived it."""
    time.sleep(1.0)  # let processes that are already exiting finish
    left = _tagged(token)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return [f"pid {p}: {c[:160]}" for p, c in sorted(left.items())]


def _read_junit(path: Path, results: dict[str, FileResult]) -> None:
    """Each test case into the result of the file it belongs to: the file whose name is a
    part of the case's classname (`tests.test_x` or `tests.test_x.TestY` for test_x.py)."""
    if not path.exists():
        return
    stems = {Path(p).stem: r for p, r in results.items()}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        name = f"{classname}::{case.get('name', '')}"
        owner = next((stems[part] for part in classname.split(".") if part in stems), None)
        if len(results) == 1:
            owner = next(iter(results.values()))
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        kind = kinds[0] if kinds else "passed"
        # A case of no known file (a collection error, say) counts against every file.
        for res in [owner] if owner is not None else results.values():
            res.tests.append((float(case.get("time", 0.0)), name))
            res.counts[kind] = res.counts.get(kind, 0) + 1
            if kind in ("failure", "error"):
                res.failed.append(f"{name} ({kind})")


def run_batch(paths: list[str], args: list[str], workdir: Path, threads: int = 0
              ) -> list[FileResult]:
    """One pytest process for `paths`, a result per file: a file fails on its own failed
    tests; a process that fails as a whole, or leaves a process behind, fails all of them.
    `threads`: torch's intra-op threads in it and in what it starts (0: torch's default)."""
    junit = workdir / (Path(paths[0]).stem + ".xml")
    token = f"{os.getpid()}-{Path(paths[0]).stem}"
    env = dict(os.environ, GAD_TEST_SUITE="1", **{TOKEN_VAR: token})
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "pytest", "-q", *paths, f"--junitxml={junit}", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=FILE_TIMEOUT_S)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[suite] {' '.join(paths)} killed after {FILE_TIMEOUT_S} s\n"
        rc = 124
    wall = time.monotonic() - start
    results = {p: FileResult(p, 0, 0.0, output=output, shared_with=len(paths) - 1)
               for p in paths}
    _read_junit(junit, results)
    leftovers = _reap_leftovers(token)
    # Imports and collection, shared evenly among the files of the process.
    overhead = max(0.0, wall - sum(t for r in results.values() for t, _ in r.tests)) / len(paths)
    for r in results.values():
        r.leftovers = leftovers
        # pytest's 1: some test failed (that file's own `failed` says which); 5: none
        # collected; anything else (a crash, a timeout, a usage error) is the process's.
        r.rc = rc if r.failed or rc not in (0, 1, 5) else 0
        r.seconds = wall if len(paths) == 1 else overhead + sum(t for t, _ in r.tests)
    return list(results.values())


def _line(res: FileResult) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in sorted(res.counts.items())) or "no tests"
    mark = "ok  " if res.ok else "FAIL"
    shared = f"  (one process with {res.shared_with} more)" if res.shared_with else ""
    return f"{mark} {res.path:<44} {res.seconds:7.1f} s  {counts}{shared}"


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    files = [a for a in argv if a.endswith(".py") or "::" in a]
    rest = [a for a in argv if a not in files]
    if not files:
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    return files, rest


def _options(argv: list[str]) -> tuple[int, int, list[str]]:
    """(-j N / --jobs N, else GAD_TEST_JOBS, else 2; --batch N, else BATCH_FILES; the other
    arguments, in their order, for pytest)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("GAD_TEST_JOBS", "2")))
    parser.add_argument("--batch", type=int, default=BATCH_FILES)
    known, rest = parser.parse_known_args(argv)
    return max(1, known.jobs), max(1, known.batch), rest


def _guess(known: dict[str, float]):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}

    def guess(f: str) -> float:
        if f in known:
            return known[f]
        return 1000.0 - rank[Path(f).name] if Path(f).name in rank else LIGHT_GUESS_S
    return guess


def _known() -> dict[str, float]:
    try:
        return json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}


def plan(files: list[str], batch: int) -> list[list[str]]:
    """The pytest processes to run, longest first: a file of SLOW_FIRST, or one recorded at
    over HEAVY_S, alone; the others in name order, `batch` to a process."""
    guess = _guess(_known())
    heavy = [f for f in files if Path(f).name in SLOW_FIRST or guess(f) > HEAVY_S]
    light = sorted(f for f in files if f not in heavy)
    groups = [[f] for f in heavy] + [light[i:i + batch] for i in range(0, len(light), batch)]
    return sorted(groups, key=lambda g: -sum(guess(f) for f in g))


def _record_durations(results: list[FileResult]) -> None:
    known = _known()
    known.update({r.path: round(r.seconds, 1) for r in results})
    try:
        DURATIONS.parent.mkdir(parents=True, exist_ok=True)
        DURATIONS.write_text(json.dumps(known, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only checkout still runs its tests


def main(argv: list[str]) -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    jobs, batch, argv = _options(argv)
    files, args = _split(argv)
    if os.environ.get("GAD_RELIABILITY_RESULTS") is None:
        from tests.reliability import RESULTS

        RESULTS.unlink(missing_ok=True)  # the table is made from this run's results only
    results: list[FileResult] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gad-suite-") as tmp, \
            ThreadPoolExecutor(jobs) as pool:
        # Each group is a pytest process of its own; a thread only waits on it.
        # A core per process when they run side by side: the gloo ranks of two multi-rank
        # files, each rank with torch's default of a thread per core, stalled one another.
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
        pending = [pool.submit(run_batch, group, args, Path(tmp), threads)
                   for group in plan(files, batch)]
        for done in as_completed(pending):
            group = done.result()
            results.extend(group)
            for res in group:
                print(_line(res), flush=True)
            bad = next((r for r in group if not r.ok), None)
            if bad is not None:
                print(bad.output[-6000:], flush=True)
                for left in bad.leftovers:
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
