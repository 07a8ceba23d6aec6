"""`python -m gad_megatron.tracking replay RUN_DIR [--uri URI]`: upload what a run spooled
while its MLflow tracking store was unreachable."""

from __future__ import annotations

import argparse
import sys

from gad_megatron.tracking.redact import redact_uri
from gad_megatron.tracking.spool import Unavailable
from gad_megatron.tracking.tracker import default_uri, replay_spool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gad_megatron.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replay", help="upload <run_dir>/mlflow_spool.jsonl to a tracking store")
    p.add_argument("run_dir")
    p.add_argument("--uri", default="", help="tracking URI ('' = the job's local sqlite store)")
    args = parser.parse_args(argv)
    uri = args.uri or default_uri(args.run_dir)
    try:
        done = replay_spool(args.run_dir, uri)
    except Unavailable as exc:
        print(f"{redact_uri(uri)} does not answer ({redact_uri(str(exc))[:300]}); "
              "the spool is kept", file=sys.stderr)
        return 1
    print(f"replayed {done} records to {redact_uri(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
