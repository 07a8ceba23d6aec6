"""tests/suite.py (`make test`): a file that leaves a process behind fails, the process is
named and killed, and a clean file next to it still passes; files that share a pytest
process keep results of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LEAKY = '''
import subprocess, sys
def test_starts_a_sleeper_and_forgets_it():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)  # leak-marker"],
                     start_new_session=True)
'''
CLEAN = '''
def test_arithmetic():
    assert 2 + 2 == 4
'''
FAILING = '''
def test_wrong_arithmetic():
    assert 2 + 2 == 5

def test_right_arithmetic():
    assert 2 + 2 == 4
'''


def run_suite(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "tests.suite", *args, "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, GAD_RELIABILITY_RESULTS=str(tmp_path / "r.jsonl"),
                                   GAD_SUITE_DURATIONS=str(tmp_path / "d.json")))


def line_of(res, name: str) -> str:
    return next(x for x in res.stdout.splitlines() if name in x and x.startswith(("ok", "FAIL")))


def _alive(marker: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                out.append(int(entry))
        except OSError:
            pass
    return out


def test_a_leaked_process_fails_its_file_and_is_killed(tmp_path):
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    (tmp_path / "test_clean.py").write_text(CLEAN)
    # --batch 1: a process per file, so that the leak is charged to its own file only
    res = run_suite(tmp_path, "--batch", "1", str(tmp_path / "test_leaky.py"),
                    str(tmp_path / "test_clean.py"))
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    leaky, clean = line_of(res, "test_leaky.py"), line_of(res, "test_clean.py")
    assert leaky.startswith("FAIL") and "1 passed" in leaky
    assert clean.startswith("ok") and "1 passed" in clean
    assert any(x.startswith("LEFT BEHIND") and "leak-marker" in x for x in lines), res.stdout
    assert lines[-1].startswith("2 files, 2 passed, 1 files failed")
    assert _alive("leak-marker") == []


def test_files_sharing_a_process_keep_their_own_results(tmp_path):
    (tmp_path / "test_failing.py").write_text(FAILING)
    (tmp_path / "test_clean.py").write_text(CLEAN)
    res = run_suite(tmp_path, "-j", "1", str(tmp_path / "test_failing.py"),
                    str(tmp_path / "test_clean.py"))
    assert res.returncode == 1, res.stdout + res.stderr
    failing, clean = line_of(res, "test_failing.py"), line_of(res, "test_clean.py")
    assert failing.startswith("FAIL") and "1 failure, 1 passed" in failing, failing
    assert clean.startswith("ok") and "1 passed" in clean and "with 1 more" in clean, clean
    assert "FAILED" in res.stdout and "test_wrong_arithmetic" in res.stdout
    assert res.stdout.splitlines()[-1].startswith("2 files, 1 failure, 2 passed, 1 files failed")


def test_options_and_the_plan_of_processes(tmp_path, monkeypatch):
    import tests.suite as suite

    assert suite._options(["-j", "3", "a.py", "-x"]) == (3, suite.BATCH_FILES, ["a.py", "-x"])
    assert suite._options(["-j1", "--batch", "2"])[:2] == (1, 2)
    assert suite._options(["--jobs=4", "--batch=3"])[:2] == (4, 3)
    monkeypatch.setenv("GAD_TEST_JOBS", "5")
    assert suite._options(["-k", "x"]) == (5, suite.BATCH_FILES, ["-k", "x"])
    files = ["tests/test_a.py", "tests/test_b.py", "tests/test_c.py", "tests/test_demo.py",
             "tests/test_worker_faults.py"]
    monkeypatch.setattr(suite, "DURATIONS", tmp_path / "none.json")  # nothing recorded
    # SLOW_FIRST's files alone and first, in its order; the others share processes
    assert suite.plan(files, 2) == [[files[4]], [files[3]], files[:2], [files[2]]]
    (tmp_path / "d.json").write_text('{"tests/test_a.py": 300, "tests/test_b.py": 5, '
                                     '"tests/test_demo.py": 5}')
    monkeypatch.setattr(suite, "DURATIONS", tmp_path / "d.json")
    # recorded over HEAVY_S: alone; worker_faults never recorded, first of SLOW_FIRST
    assert suite.plan(files, 8) == [[files[4]], [files[0]], [files[1], files[2]], [files[3]]]
