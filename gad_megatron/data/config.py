"""Data configuration, the `DataError` exception and YAML loading.

Everything the data pipeline may be asked to do is one frozen `DataConfig`, checked when it is
built, so a typo in a YAML file fails before any file is opened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LENGTH_POLICIES = ("error", "truncate", "skip")
BAD_ROW_POLICIES = ("error", "skip")
TEMPLATES = ("chat", "alpaca")
FORMATS = ("auto", "jsonl", "parquet")


class DataError(ValueError):
    """A data file (or the data config) cannot be used as asked; the message names the
    file, the row and the field where there is one."""


@dataclass(frozen=True)
class DataConfig:
    """How teacher-answer files become token batches (the `data:` section of a config)."""

    train_files: tuple[str, ...] = ()
    """Files (JSONL or Parquet) read in this order to form the training set."""
    eval_files: tuple[str, ...] = ()
    """Held-out files, same row format; read without shuffling."""
    format: str = "auto"
    """`jsonl`, `parquet`, or `auto` (by extension: .jsonl/.json/.ndjson vs .parquet/.pq)."""
    prompt_fields: tuple[str, ...] = ("prompt", "messages", "content")
    """Candidate prompt columns, first present wins. A string is a plain prompt; a list is a
    chat message list `[{role, content}]` (the paper's Parquet files use `content`)."""
    response_field: str = "teacher_response"
    """Column holding the teacher's answer text."""
    id_field: str = "id"
    """Optional id column; ids must be unique across the files read together."""
    template: str = "chat"
    """`chat`: the tokenizer's chat template with a generation prompt; `alpaca`: the fixed
    instruction wrapper (for messages, the last user message is the instruction)."""
    tokenizer: str | None = None
    """`builtin`, a local HF tokenizer directory, or None when the caller supplies one (the
    student's). `data validate` checks lengths only when this is set."""
    eos_token: str | None = None
    """Token appended to every teacher answer; None means the tokenizer's eos_token."""
    max_prompt_len: int = 1024
    """Most tokens in a rendered prompt."""
    prompt_len_policy: str = "error"
    """Over-long prompt: `error`, `truncate` (drop tokens on the left, keep the end, which
    holds the question and the generation prompt) or `skip` the row."""
    max_response_len: int = 1024
    """Most tokens in a teacher answer, EOS included."""
    response_len_policy: str = "error"
    """Over-long teacher answer: `error`, `truncate` (keep the first tokens) or `skip`."""
    keep_eos_on_truncate: bool = False
    """When truncating an answer, end it with EOS anyway. Off by default: a cut answer then
    has no EOS, so neither the student nor the discriminator learns to stop mid-sentence."""
    on_bad_row: str = "error"
    """Malformed row: `error` stops (before training starts) naming file/row/field;
    `skip` drops it and counts it by kind."""
    max_reported_errors: int = 5
    """How many bad-row messages are kept verbatim per file for reports."""
    read_batch_rows: int = 4096
    """Rows read, checked and tokenised together (Parquet record-batch size)."""
    prompts_per_batch: int = 8
    """Prompt groups per global batch (each group: one prompt, its teacher answer, and
    room for the student's samples)."""
    seed: int = 1234
    """Seed of the per-epoch shuffle."""
    shuffle: bool = True
    """Shuffle training rows every epoch (eval loaders never shuffle)."""
    drop_last: bool = True
    """Drop the final short batch of each epoch, so every step sees the same batch size."""

    def __post_init__(self) -> None:
        # Lists from YAML become tuples so the config stays hashable and immutable.
        for name in ("train_files", "eval_files", "prompt_fields"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value))
        _choice("format", self.format, FORMATS)
        _choice("template", self.template, TEMPLATES)
        _choice("prompt_len_policy", self.prompt_len_policy, LENGTH_POLICIES)
        _choice("response_len_policy", self.response_len_policy, LENGTH_POLICIES)
        _choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        if not self.prompt_fields:
            raise DataError("data config: prompt_fields must name at least one column")
        for name in ("response_field", "id_field"):
            if not getattr(self, name):
                raise DataError(f"data config: {name} must be a non-empty column name")
        if self.response_field in self.prompt_fields or self.id_field in self.prompt_fields:
            raise DataError("data config: response_field/id_field must differ from prompt_fields")
        _positive("max_prompt_len", self.max_prompt_len)
        # Room for at least one real token besides EOS.
        if self.max_response_len < 2:
            raise DataError(f"data config: max_response_len must be >= 2, got {self.max_response_len}")
        _positive("read_batch_rows", self.read_batch_rows)
        _positive("prompts_per_batch", self.prompts_per_batch)
        if self.max_reported_errors < 0:
            raise DataError("data config: max_reported_errors must be >= 0")
        if not isinstance(self.seed, int):
            raise DataError(f"data config: seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "DataConfig":
        """Build from a mapping (e.g. a YAML `data:` section); unknown keys are an error."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = [f"'{u}': did you mean '{m[0]}'?" for u in unknown
                     if (m := difflib.get_close_matches(u, sorted(known), n=1))]
            raise DataError(f"data config: unknown field(s) {unknown}"
                            + (f" ({'; '.join(hints)})" if hints else "")
                            + f"; known: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "DataConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def load_data_config(path: str | Path | None, **overrides: Any) -> DataConfig:
    """Read the `data:` section of a YAML file (None: defaults), then apply `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        text = Path(path).read_text(encoding="utf-8")
        doc = yaml.safe_load(text) or {}
        if not isinstance(doc, dict):
            raise DataError(f"{path}: top level must be a mapping")
        section = doc.get("data", {}) or {}
        if not isinstance(section, dict):
            raise DataError(f"{path}: 'data' must be a mapping, got {type(section).__name__}")
        values.update(section)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DataConfig.from_dict(values)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DataError(f"data config: {name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"data config: {name} must be a positive integer, got {value!r}")


__all__ = ["DataConfig", "DataError", "load_data_config"]
