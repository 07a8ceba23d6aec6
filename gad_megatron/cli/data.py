"""`python -m gad_megatron data {validate,make-task}`: check teacher-answer files; write the
built-in task's train/test files."""

from __future__ import annotations

import argparse
import json


def _validate(args: argparse.Namespace) -> int:
    from gad_megatron.data.config import load_data_config
    from gad_megatron.data.dataset import validate_files
    from gad_megatron.data.tokenizer import load_tokenizer

    cfg = load_data_config(args.config, tokenizer=args.tokenizer)
    # Lengths are part of what training refuses, so they are always checked: with the
    # config's (or --tokenizer's) tokenizer, else the embedded default's built-in one.
    tokenizer_name = cfg.tokenizer or "builtin"
    stats = validate_files(args.files, cfg, load_tokenizer(tokenizer_name))
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
        return 0 if stats.ok else 1
    print(stats.summary())
    if not cfg.tokenizer:
        print("note: lengths were counted with the built-in tokenizer; pass --tokenizer DIR "
              "or --config C for your student's")
    unreadable = sum(1 for f in stats.files.values() if f.error)
    bad = sum(stats.bad.values()) + stats.too_long
    verdict = "OK" if stats.ok else "FAILED"
    print(f"{verdict}: {stats.rows} rows, {bad} bad ({sum(stats.bad.values())} malformed, "
          f"{stats.too_long} too long)" + (f", {unreadable} unreadable or empty file(s)"
                                           if unreadable else "")
          + f"; checked fields and lengths ({tokenizer_name} tokenizer)")
    return 0 if stats.ok else 1


def _make_task(args: argparse.Namespace) -> int:
    from gad_megatron.data.task import write_task

    train, test = write_task(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    print(f"wrote {args.n_train} rows to {train} and {args.n_test} rows to {test} (seed {args.seed})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="validate data files; write the built-in task")
    cmds = p.add_subparsers(dest="data_command", required=True)
    v = cmds.add_parser("validate", help="check every row of JSONL/Parquet teacher-answer files")
    v.add_argument("files", nargs="+", help="JSONL or Parquet files (checked together: ids "
                   "must be unique across them)")
    v.add_argument("--config", default=None,
                   help="YAML file whose data: section holds DataConfig overrides")
    v.add_argument("--tokenizer", default=None,
                   help="'builtin' or a local HF tokenizer directory; also checks lengths "
                   "(overrides data.tokenizer)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=_validate)
    m = cmds.add_parser("make-task", help="write the built-in task's train.jsonl/test.jsonl")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--n-train", type=int, default=4000, help="training rows (default 4000)")
    m.add_argument("--n-test", type=int, default=200, help="test rows (default 200)")
    m.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    m.set_defaults(func=_make_task)
