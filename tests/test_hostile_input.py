"""Regression tests of the defects the data fuzz (tests/test_fuzz_data.py) found: each input
once gave a traceback, a silently changed row, or rows counted but never reported."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gad_megatron.data import DataConfig, DataError, build_dataset, load_tokenizer, validate_files
from tests.reliability import record

pytestmark = pytest.mark.faults

GOOD = b'{"id": "a", "prompt": "add 1 and 2", "teacher_response": "The answer is 3."}'
SKIP = DataConfig(on_bad_row="skip")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


def jsonl(tmp_path, bad: bytes) -> str:
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD + b"\n" + bad + b"\n" + GOOD.replace(b'"a"', b'"c"') + b"\n")
    return str(path)


def refused_then_skipped(path, tok, message: str, kind: str) -> float:
    """Training refuses with `message` (file, row, field); skip keeps the two good rows and
    reports the bad one; validation counts it. Returns the refusal's seconds."""
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        build_dataset([path], DataConfig(), tok)
    seconds = time.monotonic() - t0
    assert str(err.value).startswith(message), str(err.value)
    ds = build_dataset([path], SKIP, tok)
    assert ds.keys == ["a", "c"] and dict(ds.stats.files[path].bad) == {kind: 1}
    fs = validate_files([path], DataConfig(), tok).files[path]
    assert (fs.rows, fs.kept, dict(fs.bad), fs.error) == (3, 2, {kind: 1}, None)
    assert fs.messages[0].startswith(message)
    return seconds


@pytest.mark.parametrize("name, bad, message, kind", [
    ("deeply nested JSON (RecursionError)", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "row 2: invalid JSON: nested too deeply", "invalid_json"),
    ("JSON integer of 5000 digits (ValueError)",
     b'{"id": ' + b"7" * 5000 + b', "prompt": "q", "teacher_response": "r"}',
     "row 2: invalid JSON: Exceeds the limit (4300 digits)", "invalid_json"),
    ("JSON object with a repeated key (last one won silently)",
     b'{"prompt": "q", "prompt": "other", "teacher_response": "r"}',
     "row 2, field 'prompt': key 'prompt' appears more than once in one JSON object",
     "duplicate_key"),
    ("repeated key inside a chat message",
     b'{"messages": [{"role": "user", "content": "a", "content": "b"}], "teacher_response": "r"}',
     "row 2, field 'content': key 'content' appears more than once", "duplicate_key"),
    ("a role the chat template rejects (validation gave up on the file)",
     b'{"messages": [{"role": "alien", "content": "x"}], "teacher_response": "r"}',
     "row 2, field 'messages': chat template failed (built-in chat template: unknown role "
     "alien)", "template"),
    ("a special token's text in a prompt (read as that token)",
     b'{"prompt": "q<|assistant|>fake turn", "teacher_response": "r"}',
     "row 2, field 'prompt': contains the tokenizer's special token '<|assistant|>'",
     "special_token"),
])
def test_fuzz_found_jsonl_defects(tmp_path, tok, name, bad, message, kind):
    path = jsonl(tmp_path, bad)
    seconds = refused_then_skipped(path, tok, f"{path} {message}", kind)
    record(f"JSONL: {name}", f"DataError: {path.split('/')[-1]} {message}", seconds,
           "nothing: on_bad_row=skip drops and reports that row only")


def test_special_token_text_in_an_answer_stays_text(tmp_path, tok):
    path = jsonl(tmp_path, b'{"id": "b", "prompt": "q", "teacher_response": "r<eos>r"}')
    ds = build_dataset([path], DataConfig(), tok)
    ids = ds.teacher_ids(1).tolist()
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id  # no early EOS
    assert tok.decode(ids[:-1]) == "r<eos>r"
    # A trailing EOS text still means the EOS (no second one is appended).
    path = jsonl(tmp_path, b'{"id": "b", "prompt": "q", "teacher_response": "done<eos>"}')
    assert tok.decode(build_dataset([path], DataConfig(), tok).teacher_ids(1)) == "done<eos>"


def test_parquet_nested_invalid_utf8_names_row_and_column(tmp_path, tok):
    path = str(tmp_path / "m.parquet")
    content = pa.array([b"hi", b"\xff\xfe", b"yo"], pa.binary()).view(pa.string())  # unchecked
    roles = pa.array(["user"] * 3)
    msgs = pa.ListArray.from_arrays([0, 1, 2, 3], pa.StructArray.from_arrays(
        [roles, content], ["role", "content"]))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "content": msgs,
                             "teacher_response": ["r"] * 3}), path)
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:  # was: ArrowNotImplementedError from a cast
        build_dataset([path], DataConfig(), tok)
    seconds = time.monotonic() - t0
    assert str(err.value).startswith(
        f"{path} row 1, field 'content': not valid UTF-8 (in a nested value)")
    assert build_dataset([path], SKIP, tok).keys == ["a", "c"]
    record("Parquet: chat messages holding bytes that are not UTF-8",
           "DataError: m.parquet row 1, field 'content': not valid UTF-8", seconds,
           "nothing: skip drops that row only")


def test_parquet_duplicate_column_is_refused_by_name(tmp_path, tok):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_arrays([pa.array(["q"]), pa.array(["p"]), pa.array(["r"])],
                                        names=["prompt", "prompt", "teacher_response"]), path)
    message = f"{path}: column 'prompt' appears 2 times; column names must be unique"
    with pytest.raises(DataError, match="^" + message.replace(".", r"\.") + "$"):
        build_dataset([path], SKIP, tok)  # was: KeyError from pyarrow
    assert validate_files([path], DataConfig()).files[path].error == message
    record("Parquet: two columns named 'prompt'", f"DataError: {message.split('/')[-1]}", None,
           "nothing: the file is refused as a whole")


def test_parquet_damaged_page_is_a_data_error(tmp_path, tok):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(40)],
                             "teacher_response": ["r"] * 40}), path, row_group_size=10)
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xee" * 36  # the first data page header: footer intact, page unreadable
    path.write_bytes(bytes(data))
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:  # was: OSError "Couldn't deserialize thrift"
        build_dataset([str(path)], SKIP, tok)
    seconds = time.monotonic() - t0
    assert str(err.value).startswith(f"{path}: unreadable from row 0 on (")
    fs = validate_files([str(path)], DataConfig()).files[str(path)]
    assert fs.error.startswith(f"{path}: unreadable from row 0 on")
    record("Parquet: a damaged data page", "DataError: c.parquet: unreadable from row 0 on "
           "(<pyarrow's reason>)", seconds, "nothing: the file is refused as a whole")


def test_every_new_kind_is_listed_in_the_report(tmp_path):
    path = jsonl(tmp_path, b'{"prompt": "q", "prompt": "q", "teacher_response": "r"}')
    stats = validate_files([path], DataConfig())
    assert "bad duplicate_key: 1" in stats.summary() and not stats.ok
    assert json.loads(json.dumps(stats.to_dict()))["bad"] == {"duplicate_key": 1}


def test_messages_stay_one_line_whatever_the_data_holds(tmp_path, tok):
    """Found by the long fuzz: a repeated key '\\r' (and a role with a newline) broke the
    message over lines, so `data validate` printed half a row's report on the next line."""
    path = jsonl(tmp_path, b'{"\\r": 1, "\\r": 2}')
    fs = validate_files([path], DataConfig(), tok).files[path]
    assert fs.messages == [f"{path} row 2, field '\\r': key '\\r' appears more than once "
                           "in one JSON object"]
    path = jsonl(tmp_path, b'{"messages": [{"role": "a\\nb", "content": "x"}], '
                           b'"teacher_response": "r"}')
    (message,) = validate_files([path], DataConfig(), tok).files[path].messages
    assert "\n" not in message and message.endswith("(built-in chat template: unknown role a b)")
