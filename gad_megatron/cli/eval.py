"""`python -m gad_megatron eval`: score a student on held-out teacher answers.

    python -m gad_megatron eval --run runs/default/gad --test runs/default/task/test.jsonl
    python -m gad_megatron eval --student HF_DIR [--discriminator CKPT] --test FILE ...
        [--config C] [--max-new-tokens N] [--judge-url URL --judge-model M] [--out DIR]
        [data.KEY=VALUE ...] [discriminator.KEY=VALUE ...]

With `--run`, the latest actor checkpoint is exported to `RUN/export/student` (unless that
export is already newer), the run's discriminator checkpoint gives the win-rate, and the
run's resolved `config.json` gives the data settings (`--config` overrides them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Errors a user can fix (bad path, bad config, judge down): one line, no traceback.
_USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)
BUILTIN_CHECK_ROWS = 100


@dataclass
class Plan:
    """What to evaluate, resolved from the arguments."""

    student: Path
    data: object  # DataConfig
    test_files: list[str]
    discriminator: Path | None
    disc_cfg: object | None  # DiscriminatorConfig
    out: Path
    run_dir: Path | None = None
    """With --run: the stage's directory, whose MLflow run receives the report."""
    step: int = 0
    """With --run: the evaluated checkpoint's step."""


def _sections(args: argparse.Namespace, run_tree: dict):
    """(DataConfig, DiscriminatorConfig): --config beats the run's config.json."""
    from gad_megatron.config import DiscriminatorConfig
    from gad_megatron.config.loader import build, merge, parse_overrides, read_yaml
    from gad_megatron.data import DataConfig

    tree = read_yaml(args.config) if args.config else run_tree
    over = parse_overrides(list(args.overrides))
    other = sorted(set(over) - {"data", "discriminator"})
    if other:
        raise ValueError(f"eval overrides may set data.* and discriminator.* only, not {other}")
    tree = merge(tree, over)
    data = build(DataConfig, tree.get("data") or {}, "data")
    disc = build(DiscriminatorConfig, tree.get("discriminator") or {}, "discriminator")
    return data, disc


def resolve_plan(args: argparse.Namespace) -> Plan:
    from gad_megatron.checkpoint.convert import export_student
    from gad_megatron.config.loader import read_run_config
    from gad_megatron.trainer.setup import latest_checkpoint

    disc_ckpt = Path(args.discriminator) if args.discriminator else None
    run_dir, step = None, 0
    if args.run:
        ckpt = latest_checkpoint(args.run, "--run")
        run_dir = Path(args.run) if (Path(args.run) / "checkpoints").is_dir() \
            else ckpt.parent.parent
        data, disc_cfg = _sections(args, read_run_config(run_dir))
        student = export_student(run_dir, ckpt)  # RUN/export/student, unless up to date
        if disc_ckpt is None and (ckpt / "discriminator" / "gad_checkpoint.json").is_file():
            disc_ckpt = ckpt / "discriminator"  # seqkd runs have none
        out = Path(args.out) if args.out else run_dir / "eval"
        state = ckpt / "trainer_state.json"
        step = int(json.loads(state.read_text())["step"]) if state.is_file() else 0
    else:
        student = Path(args.student)
        if not (student / "config.json").is_file():
            raise FileNotFoundError(f"--student {student}: not an HF model directory "
                                    f"(no config.json)")
        data, disc_cfg = _sections(args, {})
        out = Path(args.out) if args.out else Path("eval") / student.name
    tests = list(args.test) or list(data.eval_files)
    if not tests:
        raise ValueError("no test files: pass --test FILE (or set data.eval_files)")
    for path in tests:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--test {path}: no such file")
    return Plan(student, data, tests, disc_ckpt, disc_cfg, out, run_dir, step)


def looks_like_builtin_task(test_files: list[str], data) -> bool:
    """True when the first rows are the built-in task's (its prompts, its teacher's answers),
    so its exact-match / answer-accuracy scores mean something."""
    from gad_megatron.data import iter_rows
    from gad_megatron.data.stats import DataStats
    from gad_megatron.data.task import teacher_answer, teacher_family

    stats = DataStats(strict_rows=False)
    checked = 0
    for path in test_files:
        for rows in iter_rows(path, data, stats, {}):
            for row in rows:
                prompt = row.prompt if row.messages is None else row.messages[-1]["content"]
                if teacher_family(prompt) is None or teacher_answer(prompt) != row.response:
                    return False
                checked += 1
                if checked >= BUILTIN_CHECK_ROWS:
                    return True
    return checked > 0


def _run(args: argparse.Namespace) -> int:
    from gad_megatron.data import eos_id, load_tokenizer, pad_id
    from gad_megatron.evaluation import OpenAIJudge, console_table, evaluate, write_report

    plan = resolve_plan(args)
    tokenizer = load_tokenizer(plan.data.tokenizer or str(plan.student))
    builtin = {"builtin": True, "none": False}.get(args.task)
    if builtin is None:
        builtin = looks_like_builtin_task(plan.test_files, plan.data)
    judge = None
    if args.judge_url:
        if not args.judge_model:
            raise ValueError("--judge-url needs --judge-model")
        judge = OpenAIJudge(args.judge_url, args.judge_model, api_key_env=args.judge_key_env,
                            timeout_s=args.judge_timeout)
    discriminator = None
    if plan.discriminator is not None:
        from gad_megatron.evaluation.discriminator import WorkerDiscriminator

        discriminator = WorkerDiscriminator(plan.discriminator, pad_id(tokenizer),
                                            eos_id(tokenizer, plan.data.eos_token), plan.disc_cfg)
    result = evaluate(plan.student, plan.test_files, plan.data, tokenizer,
                      args.max_new_tokens or plan.data.max_response_len, discriminator, judge,
                      builtin, limit=args.limit, batch_size=args.batch_size)
    json_path, md_path = write_report(result, plan.out)
    print(console_table(result))
    print(f"report: {json_path}\n        {md_path}")
    if plan.run_dir is not None:
        from gad_megatron.evaluation.tracking import log_report_to_run

        run_id = log_report_to_run(plan.run_dir, result, [json_path, md_path], plan.step)
        if run_id:
            print(f"        logged to MLflow run {run_id} (artifacts eval/, metrics eval/*)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _USER_ERRORS as exc:
        if os.environ.get("GAD_DEBUG"):
            raise
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 1


def register(sub) -> None:
    p = sub.add_parser("eval", help="score a student on held-out teacher answers")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (or one of its checkpoints): exports and "
                                   "evaluates its latest student, with its discriminator")
    src.add_argument("--student", help="an HF model directory to evaluate")
    p.add_argument("--discriminator", default="",
                   help="discriminator checkpoint directory (default with --run: the run's)")
    p.add_argument("--test", nargs="+", default=[], metavar="FILE",
                   help="teacher-answer files (default: the config's data.eval_files)")
    p.add_argument("--config", default="", help="YAML config whose data/discriminator "
                                                "sections apply (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="longest student answer (default: data.max_response_len)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--task", choices=("auto", "builtin", "none"), default="auto",
                   help="built-in task scores: auto-detect from the test rows, or force")
    p.add_argument("--judge-url", default="", help="OpenAI-compatible base URL of a judge")
    p.add_argument("--judge-model", default="", help="model name the judge endpoint serves")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (if any)")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge call")
    p.add_argument("--out", default="", help="report directory (default RUN/eval, or "
                                             "eval/<student name>)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data.* / discriminator.* settings over the config's")
    p.set_defaults(func=_eval)
