"""Hostile input, fuzzed: random bytes, invalid UTF-8, deep nesting, huge fields, wrong types,
missing columns, duplicate keys and ids, in JSONL and Parquet.

The only outcomes allowed: a valid dataset, or a clear error naming file, row and field.
No row is dropped silently: every row read is kept or reported (one message per problem
row), `data validate` and training agree on whether a file is usable, and nothing but a
`DataError` ever escapes. Budgets: tests/fuzz_profiles.py (`make test`: ci; `make fuzz`).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, strategies as st

from hypothesis import settings

from tests.fuzz_profiles import budget  # importing it registers and loads the budget profile

from gad_megatron.__main__ import main
from gad_megatron.data import DataConfig, DataError, build_dataset, load_tokenizer, validate_files
from tests.reliability import record

pytestmark = pytest.mark.faults

TOK = load_tokenizer("builtin")
FIELDS = ("id", "prompt", "messages", "content", "teacher_response", "extra")
_ROW = re.compile(r"^(?P<path>.+?) row (?P<row>\d+)(, field .+?)?: .+")

# --- strategies ------------------------------------------------------------------------------
good_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=30)
huge_text = st.integers(0, 20_000).map(lambda n: "x" * n)
json_leaf = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3)
                          | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=12)
text_value = st.one_of(good_text, good_text, good_text, st.text(max_size=12), huge_text,
                       json_value)
message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "", "alien"]) | json_value,
    "content": text_value, "name": json_value})
messages = st.lists(message | json_value, max_size=3) | json_value
record_st = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=2) | st.integers(-3, 3) | json_value,
    "prompt": text_value, "messages": messages, "content": messages,
    "teacher_response": text_value, "extra": json_value})


@st.composite
def jsonl_line(draw) -> bytes:
    """One line (it may hold newlines itself, which makes several lines)."""
    kind = draw(st.sampled_from(["record", "record", "record", "bytes", "mutated", "dupkey",
                                 "dupkey_msg", "deep", "bigint"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "deep":
        n = draw(st.integers(1, 3000))
        return b'{"prompt": ' + b"[" * n + b"]" * n + b', "teacher_response": "r"}'
    if kind == "bigint":
        return b'{"id": ' + b"7" * draw(st.integers(1, 6000)) + b', "prompt": "q", ' \
            b'"teacher_response": "r"}'
    rec = draw(record_st)
    text = json.dumps(rec, ensure_ascii=draw(st.booleans()), allow_nan=True)
    key = json.dumps(draw(st.sampled_from(FIELDS) | st.text(max_size=4)))
    pair = f"{key}: {json.dumps(draw(json_value))}, {key}: {json.dumps(draw(json_value))}"
    if kind == "dupkey":  # a key repeated at the top level
        text = "{" + pair + (", " + text[1:] if text != "{}" else "}")
    if kind == "dupkey_msg":  # a key repeated inside a chat message
        text = '{"messages": [{"role": "user", ' + pair + '}], "teacher_response": "r"}'
    data = text.encode("utf-8", "surrogatepass")
    if kind == "mutated":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
    return data


policy = st.sampled_from(["error", "truncate", "skip"])
data_cfg = st.builds(
    DataConfig, max_prompt_len=st.integers(1, 80), max_response_len=st.integers(2, 80),
    prompt_len_policy=policy, response_len_policy=policy, on_bad_row=st.just("skip"),
    template=st.sampled_from(["chat", "alpaca"]), read_batch_rows=st.integers(1, 5),
    max_reported_errors=st.just(10**6))


# --- the properties the outcomes must have ---------------------------------------------------
def check_validated(stats, path: str, rows: int | None) -> None:
    """Every row counted in is kept or reported, each problem row once, by file and row."""
    fs = stats.files[path]
    if fs.error is not None:  # a file-level refusal names the file
        assert rows is None or rows == 0, fs.error
        assert fs.error.startswith(path) or fs.error == "no rows (an empty file)", fs.error
        return
    if rows is not None:
        assert fs.rows == rows
    problems = sum(fs.bad.values()) + sum(v for k, v in fs.length.items()
                                          if k.endswith(("skipped", "too_long")))
    assert fs.kept + problems == fs.rows
    assert len(fs.messages) == problems
    reported = []
    for m in fs.messages:
        assert "\n" not in m, m  # one line each, whatever the data holds
        got = _ROW.match(m)
        assert got and got["path"] == path, m
        reported.append(int(got["row"]))
    assert len(set(reported)) == len(reported)  # one message per problem row


def check_built(path: str, cfg: DataConfig, stats) -> None:
    """Training agrees with the validator: skip keeps exactly the kept rows; strict refuses
    exactly the files the validator fails, naming file and row."""
    fs = stats.files[path]
    # Under a length policy of `error`, training stops at the first over-long row.
    usable = fs.error is None and fs.kept > 0 and not stats.too_long
    try:
        ds = build_dataset([path], cfg, TOK)
        assert usable and len(ds) == fs.kept == ds.stats.files[path].kept
        assert ds.stats.files[path].bad == fs.bad
    except DataError as exc:
        assert not usable, exc
    strict_ok = usable and not fs.bad and not stats.too_long
    strict = cfg.replace(on_bad_row="error")
    try:
        ds = build_dataset([path], strict, TOK)
        assert strict_ok and len(ds) == fs.kept
    except DataError as exc:
        assert not strict_ok, exc
        msg = str(exc)
        assert msg.startswith((f"{path} row ", f"{path}:", "no usable rows")), msg
        if msg.startswith(f"{path} row "):
            assert _ROW.match(msg.splitlines()[0]) is not None, msg


def _lines_count(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip())


@given(lines=st.lists(jsonl_line(), max_size=8), cfg=data_cfg)
def jsonl_property(lines, cfg):
    data = b"\n".join(lines)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "train.jsonl")
        Path(path).write_bytes(data)
        stats = validate_files([path], cfg, TOK)
        check_validated(stats, path, _lines_count(data))
        check_built(path, cfg, stats)


# --- Parquet -------------------------------------------------------------------------------
_MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@st.composite
def parquet_column(draw, n: int) -> pa.Array:
    kind = draw(st.sampled_from(["string", "large_string", "binary", "bad_utf8", "int", "float",
                                 "bool", "messages", "bad_messages", "list_int", "null"]))
    opt = lambda s: st.none() | s  # noqa: E731
    if kind in ("string", "large_string"):
        vals = draw(st.lists(opt(good_text | st.text(max_size=10) | huge_text), min_size=n,
                             max_size=n))
        return pa.array(vals, pa.string() if kind == "string" else pa.large_string())
    if kind in ("binary", "bad_utf8"):
        arr = pa.array(draw(st.lists(opt(st.binary(max_size=12)), min_size=n, max_size=n)),
                       pa.binary())
        return arr if kind == "binary" else arr.view(pa.string())  # unchecked UTF-8
    if kind == "int":
        return pa.array(draw(st.lists(opt(st.integers(-2**63, 2**63 - 1)), min_size=n,
                                      max_size=n)), pa.int64())
    if kind == "float":
        return pa.array(draw(st.lists(opt(st.floats()), min_size=n, max_size=n)), pa.float64())
    if kind == "bool":
        return pa.array(draw(st.lists(opt(st.booleans()), min_size=n, max_size=n)), pa.bool_())
    if kind == "list_int":
        return pa.array(draw(st.lists(opt(st.lists(st.integers(0, 9), max_size=3)),
                                      min_size=n, max_size=n)))
    if kind == "null":
        return pa.nulls(n)
    msg = st.fixed_dictionaries({"role": opt(st.sampled_from(["user", "system", "x", ""])),
                                 "content": opt(good_text | st.text(max_size=8))})
    vals = draw(st.lists(opt(st.lists(msg, max_size=3)), min_size=n, max_size=n))
    arr = pa.array(vals, _MSG_TYPE)
    if kind == "bad_messages" and n:  # one message content with bytes that are not UTF-8
        flat = arr.flatten()
        bad = pa.array([b"\xff\xfe" if v is not None else None
                        for v in flat.field("content").to_pylist()], pa.binary()).view(pa.string())
        structs = pa.StructArray.from_arrays([flat.field("role"), bad], ["role", "content"])
        arr = pa.ListArray.from_arrays(arr.offsets, structs, mask=arr.is_null())
    return arr


@st.composite
def parquet_table(draw) -> pa.Table:
    n = draw(st.integers(0, 6))
    names = draw(st.lists(st.sampled_from(FIELDS), max_size=6))  # repeats: duplicate columns
    return pa.Table.from_arrays([draw(parquet_column(n)) for _ in names], names=names) \
        if names else pa.table({"other": pa.nulls(n)})


@given(table=parquet_table(), cfg=data_cfg, group=st.integers(1, 4),
       damage=st.none() | st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
       cut=st.none() | st.integers(0, 10**6))
def parquet_property(table, cfg, group, damage, cut):
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "train.parquet")
        pq.write_table(table, path, row_group_size=group)
        data = Path(path).read_bytes()
        intact = damage is None and cut is None
        if damage is not None:  # overwrite bytes somewhere in the file
            at = damage[0] % max(len(data), 1)
            data = data[:at] + damage[1] + data[at + len(damage[1]):]
        if cut is not None:  # a truncated file
            data = data[:cut % max(len(data), 1)]
        Path(path).write_bytes(data)
        stats = validate_files([path], cfg, TOK)
        fs = stats.files[path]
        if intact and len(set(table.column_names)) == table.num_columns:
            assert fs.error is None or table.num_rows == 0, fs.error
        check_validated(stats, path, table.num_rows if intact and fs.error is None else None)
        check_built(path, cfg, stats)


@settings(max_examples=budget(50))
@given(lines=st.lists(jsonl_line(), min_size=1, max_size=5))
def cli_property(lines):
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "t.jsonl")
        Path(path).write_bytes(b"\n".join(lines))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["data", "validate", path, "--json"])
        report = json.loads(out.getvalue())
        assert rc == (0 if report["ok"] else 1)
        fs = report["files"][0]
        assert fs["error"] is not None or fs["rows"] == fs["kept"] + fs["bad_rows"] + sum(
            v for k, v in fs["length"].items() if k.endswith(("skipped", "too_long")))


# Each property runs its whole budget; the table row is written only once it has passed.
def test_fuzzed_jsonl_gives_a_dataset_or_named_errors():
    jsonl_property()
    record("fuzzed JSONL (random bytes, bad UTF-8, deep nesting, 6000-digit ints, 20K-char "
           "fields, wrong types, missing fields, repeated keys, duplicate ids)",
           "a dataset, or DataError / a counted bad row naming file, row and field", None,
           "nothing: every row is kept or reported, once")


def test_fuzzed_parquet_gives_a_dataset_or_named_errors():
    parquet_property()
    record("fuzzed Parquet (random column types, non-UTF-8 strings and messages, missing and "
           "duplicate columns, damaged or truncated files)",
           "a dataset, a counted bad row naming file, row and field, or a DataError naming "
           "the file", None, "nothing: every row is kept or reported, once")


def test_fuzzed_file_validate_cli_exit_code_matches_its_report():
    cli_property()
