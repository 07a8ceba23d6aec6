"""Counts of what happened to each file's rows: kept, bad (by kind), length events.

One `DataStats` travels through reading and tokenising. In strict mode (on_bad_row=error,
or a length policy of `error`) the first problem raises `DataError` at once, before any
training starts; otherwise problems are counted and the first few messages kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gad_megatron.data.config import DataError

BAD_KINDS = ("invalid_json", "missing", "empty", "wrong_type", "non_utf8", "duplicate_id")
"""Every kind of malformed row the readers report."""

LENGTH_EVENTS = (
    "prompt_truncated", "prompt_skipped", "prompt_too_long",
    "response_truncated", "response_skipped", "response_too_long",
)
"""`*_too_long` is counted when the policy is `error` (validation keeps going)."""


@dataclass(frozen=True)
class BadRow:
    """One malformed row: where it is and what is wrong."""

    source: str  # file path as given
    row: int  # 1-based line number (JSONL) or 0-based row index (Parquet)
    kind: str  # one of BAD_KINDS
    field: str | None  # offending field, None when the row as a whole is unreadable
    detail: str  # what is wrong, e.g. "missing" or "expected a string, got int"

    def __post_init__(self) -> None:
        if self.kind not in BAD_KINDS:
            raise ValueError(f"unknown bad-row kind {self.kind!r}")

    @property
    def message(self) -> str:
        where = f"{self.source} row {self.row}"
        return f"{where}, field '{self.field}': {self.detail}" if self.field else f"{where}: {self.detail}"


@dataclass
class FileStats:
    """What happened to one file's rows."""

    path: str
    rows: int = 0  # rows seen (blank JSONL lines are not rows)
    kept: int = 0  # rows that passed every check (and length policy, when tokenised)
    bad: Counter = field(default_factory=Counter)  # BAD_KINDS -> count
    length: Counter = field(default_factory=Counter)  # LENGTH_EVENTS -> count
    messages: list[str] = field(default_factory=list)  # the first few problem messages
    error: str | None = None  # the file as a whole could not be read (validation only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "error": self.error, "rows": self.rows, "kept": self.kept,
            "bad_rows": sum(self.bad.values()), "bad": dict(self.bad),
            "length": dict(self.length), "messages": list(self.messages),
        }


@dataclass
class DataStats:
    """Per-file counts plus the policy for problems (raise at once, or count)."""

    strict_rows: bool = True  # raise on the first bad row (on_bad_row=error)
    max_messages: int = 5  # messages kept per file
    files: dict[str, FileStats] = field(default_factory=dict)

    def file(self, path: str) -> FileStats:
        if path not in self.files:
            self.files[path] = FileStats(path)
        return self.files[path]

    def add_bad(self, bad: BadRow) -> None:
        if self.strict_rows:
            raise DataError(
                f"{bad.message} (on_bad_row=error; run `python -m gad_megatron data validate "
                f"{bad.source}` to list every bad row, or set on_bad_row: skip)")
        fs = self.file(bad.source)
        fs.bad[bad.kind] += 1
        self._note(fs, bad.message)

    def add_length(self, source: str, event: str, message: str, *, raise_: bool) -> None:
        """Count a length event; `raise_` (policy `error` while building) stops at once."""
        if event not in LENGTH_EVENTS:
            raise ValueError(f"unknown length event {event!r}")
        if raise_:
            raise DataError(message)
        fs = self.file(source)
        fs.length[event] += 1
        if event.endswith(("too_long", "skipped")) and message:
            self._note(fs, message)

    def _note(self, fs: FileStats, message: str) -> None:
        if len(fs.messages) < self.max_messages:
            fs.messages.append(message)

    # Totals -------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files.values())

    @property
    def kept(self) -> int:
        return sum(f.kept for f in self.files.values())

    @property
    def bad(self) -> Counter:
        return sum((f.bad for f in self.files.values()), Counter())

    @property
    def length(self) -> Counter:
        return sum((f.length for f in self.files.values()), Counter())

    @property
    def too_long(self) -> int:
        """Rows refused for their length (policy `error`)."""
        return sum(v for k, v in self.length.items() if k.endswith("too_long"))

    @property
    def dropped(self) -> int:
        """Rows a `skip` policy left out of the dataset (malformed, or too long)."""
        return sum(self.bad.values()) + sum(v for k, v in self.length.items()
                                            if k.endswith("skipped"))

    def dropped_report(self) -> str:
        """One line per file that lost rows to a `skip` policy, with the first few rows."""
        lines = []
        for fs in self.files.values():
            n = sum(fs.bad.values()) + sum(v for k, v in fs.length.items() if k.endswith("skipped"))
            if n:
                first = "; ".join(fs.messages[:3])
                lines.append(f"{fs.path}: {n} of {fs.rows} rows skipped"
                             + (f" (first: {first})" if first else ""))
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        """No bad rows and no length errors: the files would build under strict policies."""
        return (not self.bad and not any(k.endswith("too_long") for k in self.length)
                and not any(f.error for f in self.files.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "kept": self.kept, "bad": dict(self.bad),
            "length": dict(self.length), "ok": self.ok,
            "files": [f.to_dict() for f in self.files.values()],
        }

    def summary(self) -> str:
        """Human-readable report, one block per file."""
        lines = []
        for fs in self.files.values():
            nbad = sum(fs.bad.values())
            if fs.error:
                lines.append(f"{fs.path}: unreadable: {fs.error}")
                continue
            lines.append(f"{fs.path}: {fs.rows} rows, {fs.kept} kept, {nbad} bad")
            for kind in BAD_KINDS:
                if fs.bad[kind]:
                    lines.append(f"  bad {kind}: {fs.bad[kind]}")
            for event in LENGTH_EVENTS:
                if fs.length[event]:
                    lines.append(f"  length {event}: {fs.length[event]}")
            lines.extend(f"  - {m}" for m in fs.messages)
        return "\n".join(lines)
