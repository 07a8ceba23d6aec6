"""Wait until every node of a Slurm allocation has joined the job's Ray cluster.

    python slurm/ray_nodes.py --address HEAD:PORT --expect n1=10.0.0.1,n2=10.0.0.2 \
        --timeout 300 [--deadline EPOCH_S] [--out nodes.json]

Run by slurm/gad.sbatch (through srun, inside the container when there is one). Exits 0 once
Ray lists a live node at every expected address, and writes what Ray saw to --out; exits 3
after --timeout seconds (or at --deadline, a Unix time: the job's own clock) naming the nodes (Slurm name and address) that never registered.
Stands alone (no gad_megatron import) so that it runs before the project is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_MISSING = 3


def _parse_expect(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise SystemExit(f"--expect wants name=address,...; got {text!r}")
    return dict(pairs)


def _live_nodes() -> list[dict]:
    import ray

    return [{"address": n["NodeManagerAddress"], "node_id": n["NodeID"],
             "cpus": n.get("Resources", {}).get("CPU", 0),
             "gpus": n.get("Resources", {}).get("GPU", 0)}
            for n in ray.nodes() if n.get("Alive")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the head's GCS address, HOST:PORT")
    p.add_argument("--expect", required=True, help="name=address of every node, comma-separated")
    p.add_argument("--timeout", type=float, default=300.0, help="the stated limit, seconds")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="give up at this Unix time (default: now + timeout)")
    p.add_argument("--node-ip", default=os.environ.get("GAD_RAY_NODE_IP", ""),
                   help="this node's address (the Ray node this client attaches to)")
    p.add_argument("--out", default="", help="write the live nodes as JSON here")
    args = p.parse_args(argv)
    expect = _parse_expect(args.expect)

    import ray

    deadline = args.deadline or time.time() + args.timeout
    ray.init(address=args.address, _node_ip_address=args.node_ip or None,
             include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        missing = dict(expect)
        while True:
            nodes = _live_nodes()
            seen = {n["address"] for n in nodes}
            missing = {name: addr for name, addr in expect.items() if addr not in seen}
            if not missing or time.time() >= deadline:
                break
            time.sleep(1.0)
    finally:
        ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"expected": expect, "nodes": nodes}, f, indent=2)
    if missing:
        names = ", ".join(f"{n} ({a})" for n, a in missing.items())
        print(f"Ray nodes not registered within {args.timeout:g}s: {names}", flush=True)
        return EXIT_MISSING
    listed = ", ".join(f"{n} ({a})" for n, a in expect.items())
    print(f"all {len(expect)} Ray nodes registered: {listed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
