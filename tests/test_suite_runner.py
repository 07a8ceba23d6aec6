"""tests/suite.py (`make test`): a file that leaves a process behind fails, the process is
named and killed, and a clean file next to it still passes."""

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
    res = subprocess.run([sys.executable, "-m", "tests.suite", str(tmp_path / "test_leaky.py"),
                          str(tmp_path / "test_clean.py"), "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, GAD_RELIABILITY_RESULTS=str(tmp_path / "r.jsonl"),
                                  GAD_SUITE_DURATIONS=str(tmp_path / "d.json")))
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    leaky = next(x for x in lines if "test_leaky.py" in x and x.startswith(("ok", "FAIL")))
    clean = next(x for x in lines if "test_clean.py" in x and x.startswith(("ok", "FAIL")))
    assert leaky.startswith("FAIL") and "1 passed" in leaky
    assert clean.startswith("ok") and "1 passed" in clean
    assert any(x.startswith("LEFT BEHIND") and "leak-marker" in x for x in lines), res.stdout
    assert lines[-1].startswith("2 files, 2 passed, 1 files failed")
    assert _alive("leak-marker") == []


def test_jobs_option_and_longest_first_order(tmp_path, monkeypatch):
    import tests.suite as suite

    assert suite._jobs(["-j", "3", "a.py", "-x"]) == (3, ["a.py", "-x"])
    assert suite._jobs(["-j1"]) == (1, []) and suite._jobs(["--jobs=4"]) == (4, [])
    monkeypatch.setenv("GAD_TEST_JOBS", "5")
    assert suite._jobs(["-k", "x"]) == (5, ["-k", "x"])
    files = ["tests/test_a.py", "tests/test_demo.py", "tests/test_worker_faults.py"]
    monkeypatch.setattr(suite, "DURATIONS", tmp_path / "none.json")  # nothing recorded
    assert suite._longest_first(files) == [files[2], files[1], files[0]]
    (tmp_path / "d.json").write_text('{"tests/test_a.py": 300, "tests/test_demo.py": 5}')
    monkeypatch.setattr(suite, "DURATIONS", tmp_path / "d.json")
    # recorded: 300 s and 5 s; worker_faults never recorded, first of SLOW_FIRST
    assert suite._longest_first(files) == [files[2], files[0], files[1]]
