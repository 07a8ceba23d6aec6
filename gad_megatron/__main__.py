"""`python -m gad_megatron <command> ...`: one sub-command per module in gad_megatron/cli/.

Each command module defines `register(subparsers)` (adds its parser, sets `func`) and is
imported only when the CLI starts, so `--help` stays fast and optional extras stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order here is the order in `--help`.
COMMANDS = ("convert", "data", "train", "eval", "export", "demo", "compare")

DESCRIPTION = """Generative adversarial distillation (GAD) of a black-box teacher's answers into
an open student model, on Megatron-Core workers coordinated by Ray.

Typical use: `demo` runs the whole job on a built-in task; `data validate` checks your
teacher-answer files; `train CONFIG train.stage=warmup` then `train.stage=gad` trains;
`eval` and `export` read a run directory. `COMMAND --help` tells more."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gad_megatron", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"gad_megatron.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may come before or after options (`train C --backend inline a=1`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130  # the shell's code for SIGINT; the trainer has said where it stopped
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        # One clear line for the user; the traceback only with GAD_DEBUG=1.
        import os

        if os.environ.get("GAD_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
