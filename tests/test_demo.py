"""The embedded-default main job end to end, shortened, through its command
(`python -m gad_megatron demo`, what `make demo` runs): task -> warmup -> seqkd and gad
through Ray -> four evaluations -> summary table, with every stage and evaluation in MLflow."""

from __future__ import annotations

import math

import gad_megatron.__main__ as cli


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from gad_megatron.tracking.tracker import default_uri, find_run_id

    root = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(root), "--warmup-steps", "3", "--gad-steps", "2",
                     "train.prompts_per_step=4", "rollout.max_new_tokens=8",
                     "model.tiny_hidden=32"]) == 0
    printed = capsys.readouterr().out
    table = (root / "summary.md").read_text().split("```")[1].strip()
    assert table in printed
    lines = table.splitlines()
    labels = [line.split("  ")[0].strip() for line in lines[2:]]
    assert labels == ["start", "after warmup", "warmup+seqkd", "warmup+gad", "teacher"]
    for line in lines[2:6]:
        values = [float(x) for x in line.split()[-5:]]
        assert all(math.isfinite(v) and v >= 0 for v in values), line

    client = MlflowClient(tracking_uri=default_uri(root / "warmup"))
    ids = {stage: find_run_id(root / stage) for stage in ("warmup", "seqkd", "gad")}
    assert all(f"{stage} {run_id}" in printed for stage, run_id in ids.items())
    for stage in ("seqkd", "gad"):  # both continue from the warmup: its runs' children
        assert client.get_run(ids[stage]).data.tags["mlflow.parentRunId"] == ids["warmup"]
    steps = [m.step for m in client.get_metric_history(ids["warmup"], "eval/rouge_l")]
    assert sorted(steps) == [0, 3]  # the untrained student, then after warmup
    assert [m.step for m in client.get_metric_history(ids["gad"], "eval/task/exact_match")] == [2]
    assert [a.path for a in client.list_artifacts(ids["gad"], "eval/warmup_gad")] == [
        "eval/warmup_gad/eval_report.json", "eval/warmup_gad/eval_report.md"]
