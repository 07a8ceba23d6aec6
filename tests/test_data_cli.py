"""`python -m gad_megatron data validate|make-task`, and a small smoke run of the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq

from gad_megatron.__main__ import main
from gad_megatron.cli import data as data_cli
from gad_megatron.data.bench import run_bench, write_bench_parquet


def run_cli(argv):
    # Call the data command through its own parser, so the test does not depend on which
    # commands the top-level dispatcher lists today.
    import argparse

    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def test_validate_good_and_bad(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "1", "prompt": "q", "teacher_response": "a"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "prompt": "q"}) + "\n{oops\n")
    assert run_cli(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "1 rows, 1 kept, 0 bad" in out
    assert "lengths were counted with the built-in tokenizer" in out
    assert run_cli(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad} row 1, field 'teacher_response': missing" in out
    assert f"{bad} row 2: invalid JSON" in out and "FAILED: 2 rows, 2 bad" in out


def test_validate_with_config_checks_lengths(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "q", "teacher_response": "a" * 30}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  tokenizer: builtin\n  max_response_len: 8\n")
    assert run_cli(["validate", str(path), "--config", str(cfg), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["length"] == {"response_too_long": 1} and report["ok"] is False
    cfg.write_text("data:\n  tokenizer: builtin\n  max_response_len: 8\n"
                   "  response_len_policy: truncate\n")
    assert run_cli(["validate", str(path), "--config", str(cfg)]) == 0
    assert "length response_truncated: 1" in capsys.readouterr().out


def test_make_task_then_validate(tmp_path, capsys):
    out = tmp_path / "task"
    assert run_cli(["make-task", "--out", str(out), "--n-train", "90", "--n-test", "9",
                    "--seed", "3"]) == 0
    files = [str(out / "train.jsonl"), str(out / "test.jsonl")]
    assert run_cli(["validate", *files, "--tokenizer", "builtin"]) == 0
    assert ("OK: 99 rows, 0 bad (0 malformed, 0 too long); checked fields and lengths"
            in capsys.readouterr().out)


def test_validate_refuses_what_training_refuses(tmp_path, capsys):
    """An empty file, and an over-long prompt with no --config or --tokenizer given, both
    fail as training would; the summary counts the bad rows it names."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli(["validate", str(empty)]) == 1
    out = capsys.readouterr().out
    assert f"{empty}: unreadable: no rows (an empty file)" in out and "FAILED: 0 rows" in out
    long = tmp_path / "long.jsonl"
    rows = [{"prompt": "q", "teacher_response": "a"}, {"prompt": "x" * 100_000,
                                                       "teacher_response": "a"}]
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli(["validate", str(long)]) == 1
    out = capsys.readouterr().out
    assert f"{long} row 2, field 'prompt'" in out
    assert "FAILED: 2 rows, 1 bad (0 malformed, 1 too long)" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  tokenizer: builtin\n")
    assert run_cli(["validate", str(long), "--config", str(cfg)]) == 1
    assert "FAILED: 2 rows, 1 bad (0 malformed, 1 too long)" in capsys.readouterr().out


# Until the dispatcher lists "data" in COMMANDS, run the command through the same
# register()/func path the dispatcher uses.
SHIM = ("import sys, argparse; from gad_megatron.cli import data as d; "
        "p = argparse.ArgumentParser(); d.register(p.add_subparsers(required=True)); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def entry_point() -> list[str]:
    from gad_megatron.__main__ import COMMANDS

    return [sys.executable, "-m", "gad_megatron"] if "data" in COMMANDS else [
        sys.executable, "-c", SHIM]


def test_dispatcher_and_subprocess(tmp_path):
    from gad_megatron.__main__ import COMMANDS

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "q", "teacher_response": "\xff"}\n')
    if "data" in COMMANDS:
        assert main(["data", "validate", str(path)]) == 1
    res = subprocess.run([*entry_point(), "data", "validate", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"{path} row 1, field 'teacher_response': not valid UTF-8 (byte 0xff" in res.stdout


def test_bench_smoke(tmp_path):
    path = str(tmp_path / "b.parquet")
    write_bench_parquet(path, 50, row_group=16)
    assert pq.ParquetFile(path).num_row_groups == 4
    res = run_bench(50, path=path)
    assert res["rows"] == 50 and res["ok"] and res["rows_per_s"] > 0
