"""Readers and row checks: JSONL/Parquet, prompt and message forms, every bad-row kind."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gad_megatron.data import (
    DataConfig, DataError, build_dataset, load_tokenizer, validate_files,
)
from gad_megatron.data.readers import detect_format, iter_rows
from gad_megatron.data.stats import DataStats

GOOD = {"id": "a", "prompt": "add 1 and 2", "teacher_response": "The answer is 3."}


def write_jsonl(path, rows) -> str:
    """rows: dicts (dumped) or bytes/str (written verbatim as one line)."""
    with open(path, "wb") as f:
        for r in rows:
            if isinstance(r, dict):
                r = json.dumps(r)
            f.write((r.encode() if isinstance(r, str) else r) + b"\n")
    return str(path)


def read_all(path, cfg=None, stats=None):
    cfg = cfg or DataConfig()
    stats = stats or DataStats(strict_rows=cfg.on_bad_row == "error")
    return [r for chunk in iter_rows(str(path), cfg, stats, {}) for r in chunk], stats


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


def test_jsonl_prompt_and_messages_forms(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "d.jsonl", [
        GOOD, "", {"id": 7, "messages": msgs, "teacher_response": "hello"},
        {"content": msgs, "teacher_response": "yo"}])
    rows, stats = read_all(path)
    assert [r.row for r in rows] == [1, 3, 4]  # line numbers; the blank line is no row
    assert rows[0].prompt == "add 1 and 2" and rows[0].messages is None
    assert rows[1].messages == tuple(msgs) and rows[1].id == "7"
    assert rows[2].prompt_field == "content" and rows[2].id is None
    assert rows[2].key == f"{path}#4"
    assert stats.file(path).rows == 3


def test_parquet_content_layout_streams_by_batch(tmp_path):
    path = str(tmp_path / "d.parquet")
    n = 50
    pq.write_table(pa.table({
        "id": [f"r{i}" for i in range(n)],
        "content": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
        "teacher_response": [f"a{i}" for i in range(n)],
        "extra": list(range(n)),  # not read
    }), path, row_group_size=16)
    rows, _ = read_all(path, DataConfig(read_batch_rows=7))
    assert [r.row for r in rows] == list(range(n))  # 0-based row index across batches
    assert rows[49].messages == ({"role": "user", "content": "q49"},)
    assert rows[49].response == "a49" and rows[49].id == "r49"


def test_parquet_prompt_column_and_nulls(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"prompt": ["x", "y", None],
                             "teacher_response": ["1", None, "3"]}), path)
    stats = validate_files([path], DataConfig())
    fs = stats.files[path]
    assert fs.rows == 3 and fs.kept == 1 and fs.bad["missing"] == 2
    assert f"{path} row 1, field 'teacher_response': missing" in fs.messages
    assert f"{path} row 2, field 'prompt/messages/content': missing" in fs.messages


def test_format_detection():
    assert detect_format("a/b.JSONL") == "jsonl" and detect_format("x.pq") == "parquet"
    assert detect_format("x.txt", "jsonl") == "jsonl"
    with pytest.raises(DataError, match="extension"):
        detect_format("x.txt")


@pytest.mark.parametrize("line, kind, field, detail", [
    ('{"id": "b", "prompt": "q", "teacher_response": "r"', "invalid_json", None, "invalid JSON"),
    ('["not", "an", "object"]', "wrong_type", None, "expected a JSON object, got list"),
    ('{"id": "b", "prompt": "q"}', "missing", "teacher_response", "missing"),
    ('{"id": "b", "teacher_response": "r"}', "missing", "prompt/messages/content", "missing"),
    ('{"id": "b", "prompt": "  ", "teacher_response": "r"}', "empty", "prompt", "empty"),
    ('{"id": "b", "prompt": "q", "teacher_response": ""}', "empty", "teacher_response", "empty"),
    ('{"id": "", "prompt": "q", "teacher_response": "r"}', "empty", "id", "empty"),
    ('{"id": "b", "prompt": 5, "teacher_response": "r"}', "wrong_type", "prompt",
     "expected a string or a list of messages, got integer"),
    ('{"id": "b", "prompt": "q", "teacher_response": ["r"]}', "wrong_type", "teacher_response",
     "expected a string, got list"),
    ('{"id": 1.5, "prompt": "q", "teacher_response": "r"}', "wrong_type", "id",
     "expected a string or an integer, got number"),
    ('{"id": "b", "messages": [], "teacher_response": "r"}', "empty", "messages", "empty"),
    ('{"id": "b", "messages": ["hi"], "teacher_response": "r"}', "wrong_type", "messages[0]",
     "expected a message object"),
    ('{"id": "b", "messages": [{"role": "user"}], "teacher_response": "r"}', "missing",
     "messages[0].content", "missing"),
    ('{"id": "b", "messages": [{"role": "user", "content": 3}], "teacher_response": "r"}',
     "wrong_type", "messages[0].content", "expected a string, got integer"),
    ('{"id": "b", "prompt": "q", "teacher_response": "r\\udc80"}', "non_utf8",
     "teacher_response", "not valid UTF-8"),
    (b'{"id": "b", "prompt": "q\xff", "teacher_response": "r"}', "non_utf8", "prompt",
     "byte 0xff"),
    (b'{"id": "b", "prompt": "q\xff", "teacher_r', "non_utf8", None, "not valid UTF-8"),
    ('{"id": "a", "prompt": "q", "teacher_response": "r"}', "duplicate_id", "id",
     "duplicate id 'a' (first at"),
])
def test_bad_row_names_file_row_field(tmp_path, tok, line, kind, field, detail):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", line, GOOD | {"id": "c"}])
    where = f"{path} row 3"
    prefix = f"{where}, field '{field}': " if field else f"{where}: "
    # Default policy: building stops at the bad row, naming file, row and field.
    with pytest.raises(DataError) as exc:
        build_dataset([path], DataConfig(), tok)
    assert str(exc.value).startswith(prefix) and detail in str(exc.value)
    # Skip policy: the row is dropped and counted by kind; the others survive.
    ds = build_dataset([path], DataConfig(on_bad_row="skip"), tok)
    assert ds.keys == ["a", "c"]
    fs = ds.stats.files[path]
    assert fs.rows == 3 and fs.kept == 2 and dict(fs.bad) == {kind: 1}
    assert fs.messages[0].startswith(prefix) and detail in fs.messages[0]


def test_skip_counts_many_kinds_and_duplicates_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, "{bad", GOOD, GOOD | {"id": "z"}])
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD | {"id": "z"}, {"prompt": "q"}, GOOD | {"id": "y"}])
    stats = validate_files([a, b], DataConfig(max_reported_errors=2))
    assert dict(stats.files[a].bad) == {"invalid_json": 1, "duplicate_id": 1}
    assert dict(stats.files[b].bad) == {"duplicate_id": 1, "missing": 1}
    assert stats.files[b].messages[0] == (
        f"{b} row 1, field 'id': duplicate id 'z' (first at {a} row 4)")
    assert stats.rows == 7 and stats.kept == 3 and not stats.ok
    assert stats.to_dict()["bad"] == {"invalid_json": 1, "duplicate_id": 2, "missing": 1}


def test_alpaca_needs_a_user_message(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"messages": [{"role": "system", "content": "x"}], "teacher_response": "r"}])
    stats = validate_files([path], DataConfig(template="alpaca"))
    assert stats.files[path].messages == [
        f"{path} row 1, field 'messages': no 'user' message (template alpaca)"]


def test_missing_file_and_corrupt_parquet(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        build_dataset([str(tmp_path / "nope.jsonl")], DataConfig(), tok)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        build_dataset([str(bad)], DataConfig(), tok)
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    stats = validate_files([str(bad), str(tmp_path / "nope.jsonl"), good], DataConfig())
    assert "not a readable Parquet file" in stats.files[str(bad)].error
    assert stats.files[str(tmp_path / "nope.jsonl")].error.endswith("no such file")
    assert stats.files[good].kept == 1 and not stats.ok
    assert "unreadable" in stats.summary()


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="no usable rows"):
        build_dataset([path], DataConfig(on_bad_row="skip"), tok)


def test_config_validation(tmp_path):
    with pytest.raises(DataError, match="on_bad_row must be one of"):
        DataConfig(on_bad_row="ignore")
    with pytest.raises(DataError, match="max_prompt_len must be a positive integer"):
        DataConfig(max_prompt_len=0)
    with pytest.raises(DataError, match="unknown field"):
        DataConfig.from_dict({"max_len": 3})
    cfg = DataConfig.from_dict({"train_files": ["a.jsonl"], "prompt_fields": "question"})
    assert cfg.train_files == ("a.jsonl",) and cfg.prompt_fields == ("question",)
    from gad_megatron.data import load_data_config
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  template: alpaca\n  max_response_len: 64\nmodel: {}\n")
    cfg = load_data_config(y, tokenizer="builtin")
    assert (cfg.template, cfg.max_response_len, cfg.tokenizer) == ("alpaca", 64, "builtin")


def test_parquet_binary_column_with_bad_utf8(tmp_path):
    path = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({
        "prompt": pa.array([b"ok", b"bad \xfe"], pa.binary()),
        "teacher_response": ["a", "b"]}), path)
    stats = validate_files([path], DataConfig())
    assert stats.files[path].kept == 1 and dict(stats.files[path].bad) == {"non_utf8": 1}
    assert stats.files[path].messages == [
        f"{path} row 1, field 'prompt': not valid UTF-8 (byte 0xfe at character 4)"]
