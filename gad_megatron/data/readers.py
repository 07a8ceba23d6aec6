"""Streaming readers for teacher-answer files (JSONL and Parquet) and per-row field checks.

Files are read in chunks of `read_batch_rows` rows (Parquet: record batches of only the
needed columns), so a 200K-row file never sits in memory as Python objects at once.
Row numbers in messages: the 1-based line number for JSONL, the 0-based row index for
Parquet (what `pyarrow.parquet.read_table(...).slice(i, 1)` shows).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from gad_megatron.data.config import DataConfig, DataError
from gad_megatron.data.stats import BadRow, DataStats

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Row:
    """One checked row: a prompt (plain text or chat messages) and the teacher's answer."""

    source: str  # file path as given
    row: int  # row number as in messages (see module docstring)
    id: str | None  # the id column's value as a string, None when the row has none
    prompt_field: str  # the column the prompt came from (named in length messages)
    prompt: str | None  # plain-text prompt, or None when `messages` is set
    messages: tuple[dict[str, str], ...] | None  # chat messages [{role, content}]
    response: str  # the teacher's answer text

    @property
    def key(self) -> str:
        """A stable identifier: the id, else `file#row`."""
        return self.id if self.id is not None else f"{self.source}#{self.row}"


def detect_format(path: str, fmt: str = "auto") -> str:
    """`jsonl` or `parquet` for `path` (by extension when fmt is `auto`)."""
    if fmt != "auto":
        return fmt
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise DataError(f"{path}: cannot tell the format from the extension; use .jsonl or "
                    f".parquet, or set format: jsonl|parquet")


def iter_rows(path: str, cfg: DataConfig, stats: DataStats,
              seen_ids: dict[str, tuple[str, int]]) -> Iterator[list[Row]]:
    """Checked rows of one file, in chunks. Bad rows go to `stats` (which raises in strict
    mode); `seen_ids` is shared across the files read together to catch duplicate ids."""
    fs = stats.file(path)
    for chunk in iter_records(path, cfg):
        good: list[Row] = []
        for rownum, rec in chunk:
            fs.rows += 1
            res = rec if isinstance(rec, BadRow) else check_record(rec, path, rownum, cfg)
            if isinstance(res, Row) and res.id is not None:
                first = seen_ids.setdefault(res.id, (path, rownum))
                if first != (path, rownum):
                    res = BadRow(path, rownum, "duplicate_id", cfg.id_field,
                                 f"duplicate id {res.id!r} (first at {first[0]} row {first[1]})")
            if isinstance(res, BadRow):
                stats.add_bad(res)
            else:
                good.append(res)
        if good:
            yield good


def iter_records(path: str, cfg: DataConfig) -> Iterator[list[tuple[int, Any]]]:
    """Raw records `(row number, dict | BadRow)` in chunks, before field checks."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if detect_format(path, cfg.format) == "jsonl":
        yield from _jsonl_records(path, cfg.read_batch_rows)
    else:
        yield from _parquet_records(path, cfg)


def _jsonl_records(path: str, chunk_rows: int) -> Iterator[list[tuple[int, Any]]]:
    # Binary read + per-line decode, so one bad byte names its own line instead of
    # failing the whole file; surrogateescape keeps the line parseable so the check can
    # still name the field that holds the bad bytes.
    chunk: list[tuple[int, Any]] = []
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text, bad_utf8 = raw.decode("utf-8"), False
            except UnicodeDecodeError:
                text, bad_utf8 = raw.decode("utf-8", "surrogateescape"), True
            chunk.append((lineno, _parse_line(text, path, lineno, bad_utf8)))
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys silently, other readers the first: a row
    # whose meaning depends on the reader is refused instead.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _parse_line(text: str, path: str, lineno: int, bad_utf8: bool) -> Any:
    """The line's JSON value, or a BadRow saying why it has none."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        return BadRow(path, lineno, "duplicate_key", exc.key,
                      f"key {exc.key!r} appears more than once in one JSON object")
    except RecursionError:  # the C decoder stops at Python's recursion limit
        return BadRow(path, lineno, "invalid_json", None, "invalid JSON: nested too deeply")
    except json.JSONDecodeError as exc:
        if bad_utf8:
            return BadRow(path, lineno, "non_utf8", None, "line is not valid UTF-8")
        return BadRow(path, lineno, "invalid_json",
                      None, f"invalid JSON: {exc.msg} at column {exc.colno}")
    except ValueError as exc:  # e.g. an integer of more digits than int() converts
        return BadRow(path, lineno, "invalid_json", None,
                      f"invalid JSON: {str(exc).split(';')[0]}")


def _parquet_records(path: str, cfg: DataConfig) -> Iterator[list[tuple[int, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as exc:  # pyarrow raises several types for a corrupt/non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    wanted = [*cfg.prompt_fields, cfg.response_field, cfg.id_field]
    for name in wanted:
        if names.count(name) > 1:  # which copy holds the data would be a guess
            raise DataError(f"{path}: column '{name}' appears {names.count(name)} times; "
                            f"column names must be unique")
    columns = [c for c in names if c in wanted]
    start = 0
    if not columns:  # no needed column at all: every row reports its missing fields
        for n in (pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)):
            yield [(start + i, {}) for i in range(n)]
            start += n
        return
    batches = pf.iter_batches(batch_size=cfg.read_batch_rows, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:  # a damaged page, found only when read
            raise DataError(f"{path}: unreadable from row {start} on "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                            ) from None
        if batch is None:
            return
        cols = {name: _column_values(batch.column(name)) for name in batch.schema.names}
        yield [(start + i, _parquet_record(path, start + i, cols, i))
               for i in range(batch.num_rows)]
        start += batch.num_rows


def _parquet_record(path: str, row: int, cols: dict[str, list[Any]], i: int) -> Any:
    rec = {}
    for name, values in cols.items():
        value = values[i]
        if value is _UNDECODABLE:
            return BadRow(path, row, "non_utf8", name, "not valid UTF-8 (in a nested value)")
        if value is not None:  # a null is reported as a missing field, like an absent key
            rec[name] = value
    return rec


_UNDECODABLE = object()  # a nested value holding a string that is not UTF-8


def _column_values(column) -> list[Any]:
    import pyarrow as pa

    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [None if b is None else b.decode("utf-8", "surrogateescape")
                for b in column.to_pylist()]
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # A string column written without UTF-8 checks: decode per value so the row check
        # can name the row and the byte instead of the whole batch failing.
        as_bytes = column.cast(pa.large_binary() if pa.types.is_large_string(column.type)
                               else pa.binary())
        return [None if b is None else b.decode("utf-8", "surrogateescape")
                for b in as_bytes.to_pylist()]
    # Nested (e.g. chat messages): convert row by row; only the undecodable rows are bad.
    return [_scalar_value(column[i]) for i in range(len(column))]


def _scalar_value(scalar) -> Any:
    try:
        return scalar.as_py()
    except UnicodeDecodeError:
        return _UNDECODABLE


def check_record(rec: Any, source: str, row: int, cfg: DataConfig) -> Row | BadRow:
    """Check one raw record's fields; a `Row`, or a `BadRow` naming the first bad field."""
    if not isinstance(rec, dict):
        return BadRow(source, row, "wrong_type", None,
                      f"expected a JSON object, got {_type_name(rec)}")
    name = next((f for f in cfg.prompt_fields if rec.get(f) is not None), None)
    if name is None:
        return BadRow(source, row, "missing", "/".join(cfg.prompt_fields), "missing")
    value = rec[name]
    prompt = messages = None
    if isinstance(value, str):
        bad = _check_text(value, source, row, name)
        prompt = value
    elif isinstance(value, (list, tuple)):
        bad = _check_messages(value, source, row, name, need_user=cfg.template == "alpaca")
        messages = tuple(value)
    else:
        bad = BadRow(source, row, "wrong_type", name,
                     f"expected a string or a list of messages, got {_type_name(value)}")
    if bad is not None:
        return bad
    response = rec.get(cfg.response_field)
    if response is None:
        return BadRow(source, row, "missing", cfg.response_field, "missing")
    if not isinstance(response, str):
        return BadRow(source, row, "wrong_type", cfg.response_field,
                      f"expected a string, got {_type_name(response)}")
    bad = _check_text(response, source, row, cfg.response_field)
    if bad is not None:
        return bad
    rid = rec.get(cfg.id_field)
    if rid is not None:
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            return BadRow(source, row, "wrong_type", cfg.id_field,
                          f"expected a string or an integer, got {_type_name(rid)}")
        rid = str(rid)
        bad = _check_text(rid, source, row, cfg.id_field)
        if bad is not None:
            return bad
    return Row(source, row, rid, name, prompt, messages, response)


def _check_messages(value: Any, source: str, row: int, name: str, *,
                    need_user: bool) -> BadRow | None:
    if not value:
        return BadRow(source, row, "empty", name, "empty message list")
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            return BadRow(source, row, "wrong_type", where,
                          f"expected a message object, got {_type_name(msg)}")
        for key in ("role", "content"):
            if msg.get(key) is None:
                return BadRow(source, row, "missing", f"{where}.{key}", "missing")
            if not isinstance(msg[key], str):
                return BadRow(source, row, "wrong_type", f"{where}.{key}",
                              f"expected a string, got {_type_name(msg[key])}")
            if not _is_utf8(msg[key]):
                return BadRow(source, row, "non_utf8", f"{where}.{key}", _utf8_detail(msg[key]))
        if not msg["role"].strip():
            return BadRow(source, row, "empty", f"{where}.role", "empty")
    if all(not m["content"].strip() for m in value):
        return BadRow(source, row, "empty", name, "every message is empty")
    if need_user and not any(m["role"] == "user" for m in value):
        return BadRow(source, row, "missing", name, "no 'user' message (template alpaca)")
    return None


def _check_text(value: str, source: str, row: int, name: str) -> BadRow | None:
    if not value.strip():
        return BadRow(source, row, "empty", name, "empty")
    if not _is_utf8(value):
        return BadRow(source, row, "non_utf8", name, _utf8_detail(value))
    return None


def _is_utf8(text: str) -> bool:
    # Undecodable bytes survive as lone surrogates (surrogateescape, or a JSON "\udXXX"
    # escape); such text cannot be encoded, tokenised or written back.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _utf8_detail(text: str) -> str:
    for pos, ch in enumerate(text):
        if 0xDC80 <= ord(ch) <= 0xDCFF:
            return f"not valid UTF-8 (byte 0x{ord(ch) - 0xDC00:02x} at character {pos})"
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return f"not valid UTF-8 (lone surrogate U+{ord(ch):04X} at character {pos})"
    return "not valid UTF-8"


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)
