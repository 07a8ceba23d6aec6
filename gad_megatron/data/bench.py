"""Validation throughput on a generated Parquet file in the paper's layout.

    python -m gad_megatron.data.bench --rows 200000 [--tokenizer builtin]

Writes `--rows` rows (columns `id`, `content` = chat messages, `teacher_response`) to a
temporary Parquet file, then times `validate_files` on it and prints rows/s and seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from gad_megatron.data.config import DataConfig
from gad_megatron.data.dataset import validate_files

SYSTEM = "You are a helpful assistant."
ANSWER = ("Sure. Here is a careful answer to question {i}: first we restate the problem, "
          "then we work through it step by step, and finally we give the result, {r}.")


def write_bench_parquet(path: str, rows: int, row_group: int = 16384) -> None:
    """`rows` synthetic rows in the content-messages layout, written by row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    msg = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("id", pa.string()), ("content", pa.list_(msg)),
                        ("teacher_response", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            idx = range(start, min(rows, start + row_group))
            writer.write_table(pa.table({
                "id": [f"bench-{i:07d}" for i in idx],
                "content": [[{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"Question {i}: what is {i} * 7?"}]
                            for i in idx],
                "teacher_response": [ANSWER.format(i=i, r=i * 7) for i in idx],
            }, schema=schema))


def run_bench(rows: int, tokenizer: Any | None = None, path: str | None = None) -> dict:
    """Write (unless `path` exists) and validate; returns counts and timings."""
    with tempfile.TemporaryDirectory() as tmp:
        path = path or os.path.join(tmp, "bench.parquet")
        t0 = time.perf_counter()
        if not os.path.exists(path):
            write_bench_parquet(path, rows)
        t1 = time.perf_counter()
        cfg = DataConfig(max_prompt_len=4096, max_response_len=4096)
        stats = validate_files([path], cfg, tokenizer)
        t2 = time.perf_counter()
    return {"rows": stats.rows, "ok": stats.ok, "write_s": round(t1 - t0, 2),
            "validate_s": round(t2 - t1, 2), "rows_per_s": round(stats.rows / (t2 - t1)),
            "lengths_checked": tokenizer is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--tokenizer", default=None,
                    help="also tokenise and check lengths ('builtin' or a local directory)")
    ap.add_argument("--path", default=None, help="Parquet file to reuse/create (default: temp)")
    args = ap.parse_args(argv)
    tok = None
    if args.tokenizer:
        from gad_megatron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    res = run_bench(args.rows, tok, args.path)
    print(f"validated {res['rows']} rows in {res['validate_s']} s = {res['rows_per_s']} rows/s "
          f"(lengths checked: {res['lengths_checked']}; writing took {res['write_s']} s; "
          f"ok={res['ok']})")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
