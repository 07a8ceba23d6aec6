"""`python -m gad_megatron demo`: the embedded-default main job (see trainer/demo.py)."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> int:
    from gad_megatron.trainer.demo import run_demo

    table = run_demo(args.out, args.warmup_steps, args.gad_steps, tuple(args.overrides),
                     baseline=not args.no_baseline)
    print("\n" + table)
    if args.table_out:  # `make demo` keeps docs/demo_output.txt, which the README quotes
        from pathlib import Path

        Path(args.table_out).write_text(table + "\n")
    from pathlib import Path

    from gad_megatron.tracking.tracker import find_run_id, runs_page

    print(f"\nheld-out prompts of the built-in task, greedy decoding; reports in {args.out}/eval/")
    ids = {stage: run_id for stage in ("warmup", "seqkd", "gad")
           if (run_id := find_run_id(Path(args.out) / stage))}
    store = f"sqlite:///{args.out}/mlflow.db"
    runs = ", ".join(f"{stage} {run_id}" for stage, run_id in ids.items())
    print(f"MLflow runs ({runs}) in {store}; browse them with: "
          f".venv/bin/mlflow ui --backend-store-uri {store}")
    if ids:
        print(f"then open {runs_page(store, next(iter(ids.values())))}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="built-in task -> warmup -> gad -> evaluation, on CPU")
    p.add_argument("--out", default="runs/demo", help="job directory")
    p.add_argument("--warmup-steps", type=int, default=150,
                   help="steps of the warmup stage (SFT + discriminator; default 150)")
    p.add_argument("--gad-steps", type=int, default=100,
                   help="steps of the gad stage, and of the SeqKD baseline (default 100)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the equal-step seqkd baseline run")
    p.add_argument("--table-out", default="",
                   help="also write the table to this file (make demo: docs/demo_output.txt)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both stages")
    p.set_defaults(func=_demo)
