"""The built-in teacher task: short prompts answered by a deterministic "teacher" program.

It exists so the whole GAD pipeline can be run, and seen to learn, on a laptop CPU: prompts
are at most ~48 characters and answers at most ~40, the teacher answers in a fixed,
recognisable style (a short lead-in, then the answer), and the families range from easy
(copying a phrase in capitals) to hard for a tiny model (reversing, sorting, arithmetic).

The teacher is only ever seen through its text: `teacher_answer(prompt)` parses the prompt
and writes the answer, exactly as a black-box API would be used.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable, Sequence

WORDS = (
    "cat", "dog", "sun", "moon", "tree", "bird", "fish", "rain", "snow", "wind",
    "red", "blue", "green", "gold", "stone", "river", "apple", "lemon", "bread", "milk",
    "house", "door", "road", "ship", "star", "cloud", "lake", "hill", "rose", "leaf",
    "book", "pen", "lamp", "clock", "chair", "table", "music", "light", "dream", "smile",
    "tiger", "horse", "mouse", "zebra", "eagle", "otter", "panda", "koala", "camel", "llama",
)
"""Vocabulary of the string families (lower-case ASCII, 3-5 letters)."""

MAX_PHRASE_CHARS = 16
VOWELS = "aeiou"
UNKNOWN_ANSWER = "I do not know."


def _phrase(rng: random.Random, max_words: int = 3) -> str:
    while True:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        text = " ".join(words)
        if len(text) <= MAX_PHRASE_CHARS:
            return text


# Prompt makers: rng -> prompt. Each family's prompt is parsed back by TEACHER_RULES.
def _p_add(r: random.Random) -> str:
    return f"add {r.randint(0, 99)} and {r.randint(0, 99)}"


def _p_subtract(r: random.Random) -> str:
    a, b = r.randint(0, 99), r.randint(0, 99)
    return f"subtract {min(a, b)} from {max(a, b)}"


def _p_multiply(r: random.Random) -> str:
    return f"multiply {r.randint(2, 12)} by {r.randint(2, 12)}"


def _p_largest(r: random.Random) -> str:
    return "what is the largest of " + ", ".join(str(r.randint(0, 99)) for _ in range(3)) + "?"


def _p_reverse(r: random.Random) -> str:
    return f"reverse '{_phrase(r)}'"


def _p_sort(r: random.Random) -> str:
    return f"sort the letters of '{_phrase(r, max_words=2)}'"


def _p_vowels(r: random.Random) -> str:
    return f"count the vowels in '{_phrase(r)}'"


def _p_upper(r: random.Random) -> str:
    return f"uppercase '{_phrase(r)}'"


def _p_initials(r: random.Random) -> str:
    return f"initials of '{_phrase(r)}'"


PROMPT_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "add": _p_add, "subtract": _p_subtract, "multiply": _p_multiply, "largest": _p_largest,
    "reverse": _p_reverse, "sort": _p_sort, "vowels": _p_vowels, "upper": _p_upper,
    "initials": _p_initials,
}
"""Task families, in the order the generator cycles through them."""


def _vowel_answer(text: str) -> str:
    n = sum(ch in VOWELS for ch in text)
    return "There is 1 vowel." if n == 1 else f"There are {n} vowels."


def _arith(a: int, op: str, b: int, result: int) -> str:
    return f"{a} {op} {b} = {result}. The answer is {result}."


_Q = r"'([a-z ]+)'"
TEACHER_RULES: tuple[tuple[str, re.Pattern, Callable[..., str]], ...] = (
    ("add", re.compile(r"add (\d+) and (\d+)"),
     lambda a, b: _arith(int(a), "+", int(b), int(a) + int(b))),
    ("subtract", re.compile(r"subtract (\d+) from (\d+)"),
     lambda b, a: _arith(int(a), "-", int(b), int(a) - int(b))),
    ("multiply", re.compile(r"multiply (\d+) by (\d+)"),
     lambda a, b: _arith(int(a), "*", int(b), int(a) * int(b))),
    ("largest", re.compile(r"what is the largest of (\d+), (\d+), (\d+)\?"),
     lambda *xs: f"The largest is {max(map(int, xs))}."),
    ("reverse", re.compile(rf"reverse {_Q}"), lambda s: f"Reversed, it reads '{s[::-1]}'."),
    ("sort", re.compile(rf"sort the letters of {_Q}"),
     lambda s: f"In order: '{''.join(sorted(s.replace(' ', '')))}'."),
    ("vowels", re.compile(rf"count the vowels in {_Q}"), _vowel_answer),
    ("upper", re.compile(rf"uppercase {_Q}"), lambda s: f"In capitals: '{s.upper()}'."),
    ("initials", re.compile(rf"initials of {_Q}"),
     lambda s: f"The initials are '{''.join(w[0] for w in s.split()).upper()}'."),
)
"""(family, prompt pattern, answer writer): the teacher's whole behaviour."""


def teacher_family(prompt: str) -> str | None:
    """The family a prompt belongs to, or None if the teacher does not recognise it."""
    for family, pattern, _ in TEACHER_RULES:
        if pattern.fullmatch(prompt.strip()):
            return family
    return None


def teacher_answer(prompt: str) -> str:
    """The teacher's answer to `prompt` (deterministic; unknown prompts get a fixed reply)."""
    for _, pattern, write in TEACHER_RULES:
        m = pattern.fullmatch(prompt.strip())
        if m:
            return write(*m.groups())
    return UNKNOWN_ANSWER


def make_task_rows(n: int, seed: int, *, split: str = "train",
                   exclude: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """`n` rows with distinct prompts (none in `exclude`), families in turn, from `seed`.

    Rows use the same format as real data: `id`, `messages` (one user turn) and
    `teacher_response`, plus `family` (ignored by the readers, used for per-family scores).
    """
    rng = random.Random(f"gad-task:{seed}:{split}")
    families = list(PROMPT_MAKERS)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        # Families take turns; a small family (multiply has 121 prompts) that keeps
        # repeating itself gives its turn to the next one instead of stalling.
        start = len(rows) % len(families)
        drawn = None
        for family in families[start:] + families[:start]:
            for _ in range(20):
                prompt = PROMPT_MAKERS[family](rng)
                if prompt not in seen:
                    drawn = family, prompt
                    break
            if drawn:
                break
        if drawn is None:
            raise ValueError(f"cannot draw {n} distinct prompts (got {len(rows)}); ask for fewer")
        family, prompt = drawn
        seen.add(prompt)
        rows.append({"id": f"{split}-{len(rows):06d}", "family": family,
                     "messages": [{"role": "user", "content": prompt}],
                     "teacher_response": teacher_answer(prompt)})
    return rows


def write_task(out_dir: str | Path, n_train: int = 4000, n_test: int = 200,
               seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` and `test.jsonl` (disjoint prompts) under `out_dir`."""
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test = make_task_rows(n_test, seed, split="test")
    train = make_task_rows(n_train, seed, split="train",
                           exclude={r["messages"][0]["content"] for r in test})
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, rows in zip(paths, (train, test)):
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


# Scoring ------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when equal after trimming and collapsing whitespace, else 0.0."""
    return float(_norm(pred) == _norm(ref))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(pred: str, ref: str) -> float:
    """1 - edit_distance / longer length, on normalised text, in [0, 1] (two empties: 1)."""
    p, r = _norm(pred), _norm(ref)
    longest = max(len(p), len(r))
    return 1.0 if longest == 0 else 1.0 - edit_distance(p, r) / longest


_ANSWER = re.compile(r"'([^']*)'|(-?\d+)")


def extract_answer(text: str) -> str | None:
    """The answer part of a teacher-style reply: the last quoted string or number."""
    found = _ANSWER.findall(text)
    if not found:
        return None
    quoted, number = found[-1]
    return quoted if quoted or not number else number


def answer_correct(pred: str, ref: str) -> float:
    """1.0 when the extracted answers agree (style ignored), else 0.0."""
    want = extract_answer(ref)
    return float(want is not None and extract_answer(pred) == want)


def score_answers(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus means of exact_match, similarity and answer_correct (`answer_accuracy`)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    n = len(refs)
    if n == 0:
        return {"n": 0, "exact_match": 0.0, "similarity": 0.0, "answer_accuracy": 0.0}
    return {
        "n": n,
        "exact_match": sum(map(exact_match, preds, refs)) / n,
        "similarity": sum(map(similarity, preds, refs)) / n,
        "answer_accuracy": sum(map(answer_correct, preds, refs)) / n,
    }
