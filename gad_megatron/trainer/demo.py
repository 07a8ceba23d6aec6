"""The embedded-default main job: built-in task -> warmup -> gad -> evaluation, on CPU.

`python -m gad_megatron demo` (or `make demo`). Ray is started once, in-process, on loopback;
both stages run through the Ray backend; every stage is tracked in a local MLflow store.
"""

from __future__ import annotations

import time
from pathlib import Path

from gad_megatron.config import load_config

# seqkd continues the warmup's SFT (same config) for as many steps as gad runs: the
# equal-step baseline that "gad beats SeqKD" is measured against.
DEMO_CONFIGS = {"warmup": "configs/default.yaml", "gad": "configs/default_gad.yaml",
                "seqkd": "configs/default.yaml"}


def _progress(stage: str, total: int):
    """A tqdm bar over the stage's steps, showing the metrics that tell the story."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"{stage:>6}", unit="step", dynamic_ncols=True)
    keys = {"d/d_acc": "d_acc", "g/sft_loss": "sft", "g/reward_mean": "reward",
            "g/kl": "kl", "g/response_len_mean": "len"}

    def on_step(step: int, metrics: dict) -> None:
        bar.set_postfix({short: f"{metrics[k]:.3g}" for k, short in keys.items() if k in metrics})
        bar.update(1)

    return bar, on_step


def run_stage(root: Path, stage: str, steps: int, overrides: list[str]) -> Path:
    from gad_megatron.trainer.controller import train

    out = root / stage
    extra = [f"run.out_dir={out}", f"train.stage={stage}", f"train.steps={steps}",
             f"data.train_files={root / 'task' / 'train.jsonl'}",
             f"data.eval_files={root / 'task' / 'test.jsonl'}"]
    if stage in ("gad", "seqkd"):
        extra.append(f"train.init_from={root / 'warmup'}")
    cfg = load_config(DEMO_CONFIGS[stage], extra + overrides)
    bar, on_step = _progress(stage, steps)
    try:
        train(cfg, backend="ray", on_step=on_step)
    finally:
        bar.close()
    return out


def evaluate_student(root: Path, label: str, hf_dir: Path, cfg, run: Path, step: int) -> dict:
    """Greedy answers to the held-out prompts, scored against the teacher's; the report is
    written to ROOT/eval/LABEL/ and logged to the MLflow run of stage directory `run` at
    `step`. Returns the headline numbers."""
    from gad_megatron.data import load_tokenizer
    from gad_megatron.evaluation.pipeline import evaluate
    from gad_megatron.evaluation.report import write_report
    from gad_megatron.evaluation.tracking import log_report_to_run

    tokenizer = load_tokenizer(str(hf_dir))
    result = evaluate(str(hf_dir), list(cfg.data.eval_files), cfg.data, tokenizer,
                      cfg.rollout.max_new_tokens, builtin_task=True)
    files = write_report(result, root / "eval" / label)
    log_report_to_run(run, result, list(files), step, artifact_path=f"eval/{label}")
    m = result["metrics"]
    return {"exact_match": m["task"]["exact_match"], "answer_accuracy": m["task"]["answer_accuracy"],
            "similarity": m["task"]["similarity"], "rouge_l": m["rouge_l"],
            "length_ratio": m["length"]["token_ratio"]}


def summary_table(rows: list[tuple[str, dict]]) -> str:
    head = f"{'student':<16}{'exact':>8}{'answer':>8}{'similar':>9}{'ROUGE-L':>9}{'len/teacher':>13}"
    lines = [head, "-" * len(head)]
    for label, r in rows:
        lines.append(f"{label:<16}{r['exact_match']:>8.3f}{r['answer_accuracy']:>8.3f}"
                     f"{r['similarity']:>9.3f}{r['rouge_l']:>9.3f}{r['length_ratio']:>13.2f}")
    lines.append(f"{'teacher':<16}{1.0:>8.3f}{1.0:>8.3f}{1.0:>9.3f}{1.0:>9.3f}{1.0:>13.2f}")
    return "\n".join(lines)


def pin_threads() -> None:
    """One intra-op thread in the driver and (through OMP_NUM_THREADS, which worker_env
    passes on) in every worker: the order of a matmul's partial sums depends on the thread
    count, and a last-bit difference flips a greedy argmax now and then. With one thread the
    table is the same on every machine with the same CPU kind and library versions,
    whatever its core count or an inherited OMP_NUM_THREADS."""
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def run_demo(root: str | Path = "runs/demo", warmup_steps: int = 150, gad_steps: int = 100,
             overrides: tuple[str, ...] = (), baseline: bool = True) -> str:
    """The whole pipeline; returns the summary table (also written to ROOT/summary.md).

    With `baseline`, a seqkd run continues the warmup for `gad_steps` SFT steps, so that the
    table compares gad with equal-step SeqKD, not only with the warmup it started from."""
    from gad_megatron.checkpoint.convert import export_student
    from gad_megatron.cluster.runtime import start_ray, stop_ray
    from gad_megatron.data.task import write_task
    from gad_megatron.trainer.setup import latest_checkpoint

    root = Path(root)
    started = time.perf_counter()
    pin_threads()
    if not (root / "task" / "train.jsonl").exists():
        write_task(root / "task", n_train=4000, n_test=200, seed=0)
    cfg = load_config(DEMO_CONFIGS["warmup"], [
        f"run.out_dir={root}", f"data.train_files={root / 'task' / 'train.jsonl'}",
        f"data.eval_files={root / 'task' / 'test.jsonl'}", *overrides])
    start_ray(cfg.run)
    try:
        warm = run_stage(root, "warmup", warmup_steps, list(overrides))
        seqkd = run_stage(root, "seqkd", gad_steps, list(overrides)) if baseline else None
        gad = run_stage(root, "gad", gad_steps, list(overrides))
    finally:
        stop_ray()
    rows = []
    # (label, stage directory whose MLflow run gets the report, step): the untrained student
    # is reported at step 0 of the warmup run.
    runs = [("start", warm, 0), ("after warmup", warm, warmup_steps),
            ("warmup+seqkd", seqkd, gad_steps), ("warmup+gad", gad, gad_steps)]
    for label, run, step in runs:
        if run is None:  # no baseline run
            continue
        if step == 0:
            hf_dir = warm / "init_model"
        else:
            hf_dir = export_student(run, latest_checkpoint(str(run)))
        name = label.replace(" ", "_").replace("+", "_")
        rows.append((label, evaluate_student(root, name, hf_dir, cfg, run, step)))
    table = summary_table(rows)
    minutes = (time.perf_counter() - started) / 60
    (root / "summary.md").write_text(f"```\n{table}\n```\n\n{minutes:.1f} minutes\n")
    return table


README_MARK = "<!-- demo-table: docs/demo_output.txt -->"
"""The README line that precedes the quoted demo table (tests/test_readme_table.py)."""


def readme_table(readme: str) -> str:
    """The code block that follows README_MARK in the README's text."""
    if README_MARK not in readme:
        raise ValueError(f"README has no {README_MARK!r} line before the demo table")
    after = readme.split(README_MARK, 1)[1]
    return after.split("```", 2)[1].strip("\n")


MACHINE_ROWS: dict[str, float] = {"warmup+gad": 0.02}
"""Rows of the demo table that depend on the machine's floating-point kernels, with how far
each of their cells may move on another machine. Measured: on an AMD EPYC (AVX-512) 2-core
machine the gad row's cells moved by at most 0.005 from this Intel Xeon's, while every other
row was identical (100 steps of sampling from the student amplify last-bit differences of
the matmul kernels into other samples); the bound is four times that. Every other row must
match character for character."""


def _cells(line: str) -> tuple[str, list[float]]:
    label = line[:16].strip()
    return label, [float(x) for x in line[16:].split()]


def check_readme(readme_path: str | Path, table_path: str | Path,
                 tolerant: bool = False) -> None:
    """Raise unless the README quotes exactly the table in `table_path` (a demo output
    file, or a run's summary.md). `tolerant`: the table comes from another machine, so the
    MACHINE_ROWS may differ by their bound, cell by cell; the other rows may not."""
    table = Path(table_path).read_text()
    if "```" in table:  # summary.md: the table is its first code block
        table = table.split("```", 2)[1]
    quoted = readme_table(Path(readme_path).read_text())
    if quoted.strip("\n") == table.strip("\n"):
        return
    mine, theirs = quoted.strip("\n").splitlines(), table.strip("\n").splitlines()
    problems = [] if tolerant and len(mine) == len(theirs) else ["the tables differ"]
    for a, b in zip(mine, theirs) if not problems else ():
        if a == b:
            continue
        (label, x), (label_b, y) = _cells(a), _cells(b)
        bound = MACHINE_ROWS.get(label)
        if label != label_b or bound is None or len(x) != len(y):
            problems.append(f"row {label!r} must match exactly")
        elif max(abs(u - v) for u, v in zip(x, y)) > bound + 1e-9:
            problems.append(f"row {label!r} moved by more than {bound} in a cell")
    if problems:
        raise ValueError(f"the README's demo table differs from {table_path} "
                         f"({'; '.join(problems)}):\nREADME:\n{quoted}\n{table_path}:\n"
                         f"{table.strip()}")
