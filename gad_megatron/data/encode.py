"""Rendering prompts (chat template or Alpaca wrapper) and tokenising teacher answers.

Prompt and answer are tokenised separately and their ids concatenated, so the boundary is
exact (no merge across it) and the answer is exactly the continuation the student must
produce. Every answer ends with the EOS id (appended unless already last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gad_megatron.data.config import DataConfig, DataError
from gad_megatron.data.readers import Row
from gad_megatron.data.stats import DataStats
from gad_megatron.data.tokenizer import eos_id

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Encoded:
    """One row as token ids, after the length policies."""

    key: str  # row id, or file#row
    prompt_ids: np.ndarray  # int32, the rendered prompt (generation prompt included)
    teacher_ids: np.ndarray  # int32, the teacher answer, EOS-terminated unless truncated


class Encoder:
    """Turns checked rows into token ids under one config and tokenizer."""

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.eos = eos_id(tokenizer, cfg.eos_token)
        if cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("template: chat, but the tokenizer has no chat_template; "
                            "use template: alpaca or a tokenizer with a chat template")

    def render(self, row: Row) -> str:
        """The prompt text the student sees, ending where its answer starts."""
        if self.cfg.template == "alpaca":
            return ALPACA_TEMPLATE.format(prompt=_instruction(row))
        messages = list(row.messages) if row.messages is not None else [
            {"role": "user", "content": row.prompt}]
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises TemplateError for e.g. an unknown role
            raise DataError(f"{row.source} row {row.row}, field '{row.prompt_field}': "
                            f"chat template failed ({exc})") from exc

    def encode(self, rows: list[Row], stats: DataStats, *,
               strict_lengths: bool) -> list[Encoded]:
        """Tokenise a chunk; rows dropped by a `skip` policy are counted, not returned.

        `strict_lengths` raises on the first over-long row whose policy is `error` (when
        building a dataset); otherwise such rows are counted as `*_too_long` (validation).
        """
        tok = self.tokenizer
        prompts = [self.render(r) for r in rows]
        # The chat template writes its own BOS; the Alpaca text relies on the tokenizer's.
        add_special = self.cfg.template == "alpaca"
        p_ids = tok(prompts, add_special_tokens=add_special)["input_ids"]
        r_ids = tok([r.response for r in rows], add_special_tokens=False)["input_ids"]
        out = []
        for row, p, r in zip(rows, p_ids, r_ids):
            if not r or r[-1] != self.eos:
                r = [*r, self.eos]
            p = self._limit_prompt(row, p, stats, strict_lengths)
            r = None if p is None else self._limit_response(row, r, stats, strict_lengths)
            if r is None:
                continue
            stats.file(row.source).kept += 1
            out.append(Encoded(row.key, np.asarray(p, np.int32), np.asarray(r, np.int32)))
        return out

    def _limit_prompt(self, row: Row, ids: list[int], stats: DataStats,
                      strict: bool) -> list[int] | None:
        limit, policy = self.cfg.max_prompt_len, self.cfg.prompt_len_policy
        if len(ids) <= limit:
            return ids
        if policy == "truncate":
            stats.add_length(row.source, "prompt_truncated", "", raise_=False)
            return ids[-limit:]  # keep the end: the question and the generation prompt
        if policy == "skip":
            stats.add_length(row.source, "prompt_skipped", _too_long(
                row, row.prompt_field, len(ids), "max_prompt_len", limit), raise_=False)
            return None
        stats.add_length(row.source, "prompt_too_long", _too_long(
            row, row.prompt_field, len(ids), "max_prompt_len", limit), raise_=strict)
        return None

    def _limit_response(self, row: Row, ids: list[int], stats: DataStats,
                        strict: bool) -> list[int] | None:
        limit, policy = self.cfg.max_response_len, self.cfg.response_len_policy
        if len(ids) <= limit:
            return ids
        if policy == "truncate":
            stats.add_length(row.source, "response_truncated", "", raise_=False)
            ids = ids[:limit]
            if self.cfg.keep_eos_on_truncate:
                ids[-1] = self.eos
            return ids
        if policy == "skip":
            stats.add_length(row.source, "response_skipped", _too_long(
                row, self.cfg.response_field, len(ids), "max_response_len", limit),
                raise_=False)
            return None
        stats.add_length(row.source, "response_too_long", _too_long(
            row, self.cfg.response_field, len(ids), "max_response_len", limit), raise_=strict)
        return None


def _instruction(row: Row) -> str:
    if row.messages is None:
        return row.prompt or ""
    # Alpaca has one instruction slot: the last user turn (checked present by the reader).
    return next(m["content"] for m in reversed(row.messages) if m["role"] == "user")


def _too_long(row: Row, field: str, n: int, limit_name: str, limit: int) -> str:
    policy = "prompt_len_policy" if limit_name == "max_prompt_len" else "response_len_policy"
    return (f"{row.source} row {row.row}, field '{field}': {n} tokens > {limit_name} "
            f"{limit} ({policy}=error)")
