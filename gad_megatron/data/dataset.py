"""A tokenised dataset held as flat int32 arrays, built (and fully validated) up front.

`build_dataset` reads every file to the end before returning, so a bad row or an
over-long one under an `error` policy stops the run before training starts. The result
costs 4 bytes per token plus two offset arrays, whatever the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from gad_megatron.data.config import DataConfig, DataError
from gad_megatron.data.encode import Encoded, Encoder
from gad_megatron.data.readers import iter_rows
from gad_megatron.data.stats import DataStats


@dataclass(frozen=True)
class Example:
    """One prompt with its teacher answer, as token ids."""

    index: int  # position in the dataset
    key: str  # row id, or file#row
    prompt_ids: np.ndarray  # int32 [P]
    teacher_ids: np.ndarray  # int32 [R], EOS-terminated unless truncated


class TokenDataset:
    """Prompts and teacher answers as token ids, indexable by row."""

    def __init__(self, keys: Sequence[str], prompt_tokens: np.ndarray,
                 prompt_offsets: np.ndarray, teacher_tokens: np.ndarray,
                 teacher_offsets: np.ndarray, stats: DataStats | None = None) -> None:
        if not (len(keys) + 1 == len(prompt_offsets) == len(teacher_offsets)):
            raise ValueError("TokenDataset: keys and offsets disagree in length")
        self.keys = list(keys)
        self._pt, self._po = prompt_tokens, prompt_offsets
        self._tt, self._to = teacher_tokens, teacher_offsets
        self.stats = stats if stats is not None else DataStats()

    @classmethod
    def from_encoded(cls, items: Iterable[Encoded], stats: DataStats | None = None) -> "TokenDataset":
        items = list(items)
        return cls([e.key for e in items], *_flatten([e.prompt_ids for e in items]),
                   *_flatten([e.teacher_ids for e in items]), stats=stats)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        i %= len(self)
        return Example(i, self.keys[i], self.prompt_ids(i), self.teacher_ids(i))

    def prompt_ids(self, i: int) -> np.ndarray:
        return self._pt[self._po[i]:self._po[i + 1]]

    def teacher_ids(self, i: int) -> np.ndarray:
        return self._tt[self._to[i]:self._to[i + 1]]

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.diff(self._po)

    @property
    def teacher_lengths(self) -> np.ndarray:
        return np.diff(self._to)

    def __repr__(self) -> str:
        return (f"TokenDataset(rows={len(self)}, prompt_tokens={len(self._pt)}, "
                f"teacher_tokens={len(self._tt)})")


def build_dataset(paths: Sequence[str], cfg: DataConfig, tokenizer: Any) -> TokenDataset:
    """Read, check and tokenise every file now; raises `DataError` per the policies.

    With `on_bad_row: skip` (and `skip`/`truncate` length policies) problems are counted
    in `dataset.stats` instead. An empty result is always an error.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise DataError("no data files given")
    encoder = Encoder(tokenizer, cfg)
    stats = DataStats(strict_rows=cfg.on_bad_row == "error", max_messages=cfg.max_reported_errors)
    seen: dict[str, tuple[str, int]] = {}
    # Flatten per chunk: one small array per row would cost ~100 bytes of overhead each.
    keys: list[str] = []
    prompts: list[tuple[np.ndarray, np.ndarray]] = []
    teachers: list[tuple[np.ndarray, np.ndarray]] = []
    for path in paths:
        for rows in iter_rows(str(path), cfg, stats, seen):
            items = encoder.encode(rows, stats, strict_lengths=True)
            keys.extend(e.key for e in items)
            prompts.append(_flatten([e.prompt_ids for e in items]))
            teachers.append(_flatten([e.teacher_ids for e in items]))
        if stats.file(str(path)).rows == 0:
            raise DataError(f"{path}: no rows (an empty file)")
    if not keys:
        raise DataError(f"no usable rows in {', '.join(map(str, paths))}:\n{stats.summary()}")
    return TokenDataset(keys, *_join(prompts), *_join(teachers), stats=stats)


def validate_files(paths: Sequence[str], cfg: DataConfig,
                   tokenizer: Any | None = None) -> DataStats:
    """Check every row of every file and count problems; never raises for a bad row.

    Field checks need no tokenizer; with one, lengths are checked too under the config's
    policies (an over-long row under `error` counts as `*_too_long`). Files share one id
    set, so an id repeated in another file is a duplicate too. A missing or unreadable
    file is recorded in its `FileStats.error` and the other files are still checked.
    """
    stats = DataStats(strict_rows=False, max_messages=cfg.max_reported_errors)
    encoder = Encoder(tokenizer, cfg) if tokenizer is not None else None
    seen: dict[str, tuple[str, int]] = {}
    for path in paths:
        path = str(path)
        fs = stats.file(path)
        try:
            for rows in iter_rows(path, cfg, stats, seen):
                if encoder is None:
                    fs.kept += len(rows)
                else:
                    encoder.encode(rows, stats, strict_lengths=False)
        except DataError as exc:  # missing or unreadable file: report it, check the rest
            fs.error = str(exc)
        if fs.error is None and fs.rows == 0:
            fs.error = "no rows (an empty file)"  # training refuses it too
    return stats


def _join(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (flat, offsets) pairs into one, shifting each part's offsets."""
    flat = np.concatenate([f for f, _ in parts]).astype(np.int32, copy=False)
    offsets, base = [np.zeros(1, np.int64)], 0
    for f, o in parts:
        offsets.append(o[1:] + base)
        base += len(f)
    return flat, np.concatenate(offsets)


def _flatten(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    if arrays:
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays).astype(np.int32, copy=False)
    else:
        flat = np.zeros(0, np.int32)
    return flat, offsets
