"""`python -m gad_megatron eval`: a student directory, a whole run, and clear failures."""

from __future__ import annotations

import json

import pytest

import gad_megatron.__main__ as cli
from gad_megatron.data import build_builtin_tokenizer
from gad_megatron.data.task import write_task
from tests.test_eval import make_student


def test_eval_student_dir(tmp_path, capsys):
    _, test = write_task(tmp_path / "task", n_train=4, n_test=5)
    student = make_student(tmp_path / "student", build_builtin_tokenizer())
    out = tmp_path / "report"
    rc = cli.main(["eval", "--student", str(student), "--test", str(test),
                   "--max-new-tokens", "8", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "ROUGE-L" in text and "task exact match" in text  # built-in task auto-detected
    assert str(out / "eval_report.json") in text
    report = json.loads((out / "eval_report.json").read_text())
    assert report["n"] == 5 and report["setup"]["builtin_task"] is True
    assert "discriminator" not in report["metrics"]
    assert (out / "eval_report.md").read_text().startswith("# Evaluation report")


def test_key_value_overrides_reach_the_data_settings(tmp_path, capsys):
    _, test = write_task(tmp_path / "task", n_train=4, n_test=3)
    student = make_student(tmp_path / "student", build_builtin_tokenizer())
    out = tmp_path / "report"
    # No --max-new-tokens: the answer budget is data.max_response_len, set here by override.
    assert cli.main(["eval", "--student", str(student), "--test", str(test), "--out", str(out),
                     "data.max_response_len=7", "data.response_len_policy=truncate"]) == 0
    assert json.loads((out / "eval_report.json").read_text())["setup"]["max_new_tokens"] == 7
    capsys.readouterr()
    for bad, needle in (("actor.optim.lr=1", "data.* and discriminator.* only"),
                        ("data.no_such_field=1", "no_such_field")):
        # (after a --test list, key=value words would be read as more test files)
        assert cli.main(["eval", "--student", str(student), bad, "--test", str(test)]) != 0
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args, needle", [
    (["--student", "/nonexistent/model", "--test", "x.jsonl"], "not an HF model directory"),
    (["--run", "/nonexistent/run", "--test", "x.jsonl"], "--run=/nonexistent/run: no such run"),
])
def test_bad_paths_fail_with_one_line(args, needle, capsys):
    assert cli.main(["eval", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_missing_test_file_fails_with_one_line(tmp_path, capsys):
    student = make_student(tmp_path / "student", build_builtin_tokenizer())
    capsys.readouterr()  # drop the model writer's progress bar
    rc = cli.main(["eval", "--student", str(student), "--test", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "no such file" in err and len(err.splitlines()) == 1


def test_eval_run_exports_and_uses_its_discriminator(tmp_path, capsys):
    from gad_megatron.config import load_config
    from gad_megatron.trainer.controller import train

    _, test = write_task(tmp_path / "task", n_train=16, n_test=4)
    cfg = load_config("configs/default.yaml", [
        f"run.out_dir={tmp_path / 'run'}", "train.steps=1", "train.d_only_steps=0",
        "train.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=4",
        f"data.train_files={tmp_path / 'task' / 'train.jsonl'}", "model.tiny_hidden=32"])
    train(cfg, backend="inline")
    run = tmp_path / "run"
    rc = cli.main(["eval", "--run", str(run), "--test", str(test), "--max-new-tokens", "6"])
    assert rc == 0, capsys.readouterr().err
    assert (run / "export" / "student" / "config.json").is_file()
    report = json.loads((run / "eval" / "eval_report.json").read_text())
    d = report["metrics"]["discriminator"]
    assert d["n"] == 4 and 0.0 <= d["win_rate"] <= 1.0
    assert all(isinstance(r["d_student"], float) for r in report["rows"])
    assert "D win-rate" in capsys.readouterr().out
    # The report went to the stage's own MLflow run, read back through the MLflow client.
    from mlflow.tracking import MlflowClient

    from gad_megatron.tracking.tracker import default_uri, find_run_id

    client = MlflowClient(tracking_uri=default_uri(run))
    run_id = find_run_id(run)
    history = client.get_metric_history(run_id, "eval/discriminator/win_rate")
    assert [(m.step, m.value) for m in history] == [(1, d["win_rate"])]
    assert client.get_metric_history(run_id, "eval/rouge_l")[0].value == report["metrics"]["rouge_l"]
    assert sorted(a.path for a in client.list_artifacts(run_id, "eval")) == [
        "eval/eval_report.json", "eval/eval_report.md"]


def test_eval_metrics_flatten_numeric_leaves():
    from gad_megatron.evaluation.tracking import eval_metrics

    result = {"n": 3, "metrics": {"rouge_l": 0.5, "length": {"token_ratio": 1.25,
                                                             "student_tokens": {"mean": 4}},
                                  "task": {"exact_match": 0.0, "per_row": [1, 0, 0]},
                                  "flag": True}}
    assert eval_metrics(result) == {"eval/rouge_l": 0.5, "eval/length/token_ratio": 1.25,
                                    "eval/length/student_tokens/mean": 4.0,
                                    "eval/task/exact_match": 0.0, "eval/n": 3.0}


def test_eval_with_judge(tmp_path, capsys):
    from tests.test_judge import FakeServer

    _, test = write_task(tmp_path / "task", n_train=4, n_test=3)
    student = make_student(tmp_path / "student", build_builtin_tokenizer())
    server = FakeServer()
    try:
        rc = cli.main(["eval", "--student", str(student), "--test", str(test), "--task", "none",
                       "--max-new-tokens", "4", "--out", str(tmp_path / "r"),
                       "--judge-url", server.url, "--judge-model", "judge-model"])
    finally:
        server.close()
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "eval_report.json").read_text())
    judge = report["metrics"]["judge"]
    # The fake judge rates anything but "good" 2 against its reference's 8: 2 / (2 + 8).
    assert judge["n"] == 3 and judge["student_score"] == pytest.approx(0.2)
    assert "task" not in report["metrics"] and len(server.requests) == 9
    assert report["rows"][0]["judge"]["reference"] == "The answer is 42."
    assert "judge score student" in capsys.readouterr().out


def test_eval_report_with_the_tracking_server_down_warns_and_keeps_the_files(tmp_path, caplog):
    import socket

    from gad_megatron.evaluation.tracking import log_report_to_run
    from gad_megatron.tracking import spool

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"tracking": {"tracking_uri": f"http://user:secret@127.0.0.1:{port}"}}))
    (run / spool.RUN_ID_FILE).write_text("0123456789abcdef")
    report = tmp_path / "eval_report.json"
    report.write_text("{}")
    with caplog.at_level("WARNING"):
        assert log_report_to_run(run, {"n": 1, "metrics": {"rouge_l": 0.5}}, [report], 3) is None
    assert "could not log the report" in caplog.text and "secret" not in caplog.text
    assert report.read_text() == "{}"
