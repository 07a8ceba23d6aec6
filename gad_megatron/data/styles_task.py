"""The second built-in task: a stochastic, multimodal black-box teacher ("styles").

The first built-in task (data/task.py) has one exact answer per prompt, which SFT on that
answer learns best. Here the teacher, at every call, picks at random
- how many answers to give (1, 2 or 3; each prompt has several correct ones, e.g. any even
  number in a range), which ones, in which order, and
- one of three answer styles, each self-consistent: a lead-in that announces the count in
  the style's own way, then a body in that style's own layout:

      words   "Two picks: 14 and 22."          "Three picks: 14, 22 and 18."
      tag     "[2] 14; 22"                     "[3] 14; 22; 18"
      arrow   "2 of them -> 14, 22"            "3 of them -> 14, 22, 18"

A learner that spreads probability over every mode and samples at temperature 0.8 can mix
them ("[2] 14 and 22.", "Three picks: 14.") into answers the teacher never writes; one that
commits to modes writes answers that are each valid. `accepts(prompt, answer)` is the
teacher's own acceptance test: right style, lead-in agreeing with the body, every item
correct for the prompt, no item twice.

Splits: train and an in-distribution test draw numbers up to 59 (four families); the
out-of-distribution split asks the three numeric families about ranges 60-99, which no
training prompt covers (longer numbers, new prompt strings).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Callable

from gad_megatron.data.task import WORDS

COUNT_WORDS = ("One", "Two", "Three")
STYLES = ("words", "tag", "arrow")
LETTERS = tuple(sorted({w[0] for w in WORDS if sum(v[0] == w[0] for v in WORDS) >= 3}))
"""Initial letters with at least 3 words in WORDS (the word family needs 3 answers)."""
ID_MAX, OOD_MIN, OOD_MAX = 59, 60, 99


# Prompts -------------------------------------------------------------------------------------
def _range(r: random.Random, lo: int, hi: int) -> tuple[int, int]:
    a = r.randint(lo, hi - 6)
    return a, min(hi, a + r.randint(6, 16))  # width >= 6: at least 3 even and 3 odd numbers


def _p_even(r: random.Random, lo: int, hi: int) -> str:
    return "give even numbers from {} to {}".format(*_range(r, lo, hi))


def _p_odd(r: random.Random, lo: int, hi: int) -> str:
    return "give odd numbers from {} to {}".format(*_range(r, lo, hi))


def _p_mult(r: random.Random, lo: int, hi: int) -> str:
    k = r.randint(3, 9)
    # OOD: the cap is in 60..99; ID: at least 3 multiples below the cap.
    return f"give multiples of {k} up to {r.randint(max(lo, 3 * k), hi)}"


def _p_word(r: random.Random, lo: int, hi: int) -> str:
    return f"give words starting with {r.choice(LETTERS)}"


ID_FAMILIES: dict[str, Callable[[random.Random, int, int], str]] = {
    "even": _p_even, "odd": _p_odd, "mult": _p_mult, "word": _p_word}
OOD_FAMILIES = {k: v for k, v in ID_FAMILIES.items() if k != "word"}

_PROMPTS = (
    ("even", re.compile(r"give even numbers from (\d+) to (\d+)")),
    ("odd", re.compile(r"give odd numbers from (\d+) to (\d+)")),
    ("mult", re.compile(r"give multiples of (\d+) up to (\d+)")),
    ("word", re.compile(r"give words starting with ([a-z])")),
)


def valid_items(prompt: str) -> set[str] | None:
    """Every correct answer item of `prompt` (as text), or None if it is not a task prompt."""
    for family, pattern in _PROMPTS:
        m = pattern.fullmatch(prompt.strip())
        if not m:
            continue
        if family == "word":
            return {w for w in WORDS if w[0] == m.group(1)}
        a, b = int(m.group(1)), int(m.group(2))
        if family == "mult":
            return {str(x) for x in range(a, b + 1, a)}
        parity = 0 if family == "even" else 1
        return {str(x) for x in range(a, b + 1) if x % 2 == parity}
    return None


def task_prompt(text: str) -> str | None:
    """The task prompt inside a rendered prompt (chat template or Alpaca wrapper around it),
    or None when `text` holds none."""
    for _, pattern in _PROMPTS:
        m = pattern.search(text)
        if m:
            return m.group(0)
    return None


# The teacher ----------------------------------------------------------------------------------
def render(style: str, items: list[str]) -> str:
    """One answer in `style` giving `items` (1 to 3): lead-in, then the body."""
    k = len(items)
    if style == "words":
        body = items[0] if k == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        return f"{COUNT_WORDS[k - 1]} pick{'s' if k > 1 else ''}: {body}."
    if style == "tag":
        return f"[{k}] " + "; ".join(items)
    if style == "arrow":
        return f"{k} of them -> " + ", ".join(items)
    raise ValueError(f"unknown style {style!r}; one of {STYLES}")


def teacher_respond(prompt: str, rng: random.Random) -> str:
    """One call of the black-box teacher: a random style, count and choice of answers."""
    valid = valid_items(prompt)
    if valid is None:
        raise ValueError(f"not a prompt of the styles task: {prompt!r}")
    k = rng.randint(1, 3)
    items = rng.sample(sorted(valid), k)
    return render(rng.choice(STYLES), items)


# The teacher's acceptance test -----------------------------------------------------------------
_ITEM = r"[a-z]+|\d+"
_PARSERS = (  # (style, layout, joiners between items)
    ("words", re.compile(rf"(One|Two|Three) picks?: ((?:{_ITEM})(?:(?:, | and )(?:{_ITEM}))*)\."),
     ", | and "),
    ("tag", re.compile(rf"\[(\d)\] ((?:{_ITEM})(?:; (?:{_ITEM}))*)"), "; "),
    ("arrow", re.compile(rf"(\d) of them -> ((?:{_ITEM})(?:, (?:{_ITEM}))*)"), ", "),
)


def parse_answer(answer: str) -> tuple[str, int, list[str]] | None:
    """(style, announced count, items) of an answer the teacher could have laid out, or None
    when its layout is no style's (including a style's lead-in with another's joiners)."""
    text = answer.strip()
    for style, pattern, joiners in _PARSERS:
        m = pattern.fullmatch(text)
        if not m:
            continue
        lead, body = m.group(1), m.group(2)
        count = COUNT_WORDS.index(lead) + 1 if style == "words" else int(lead)
        items = re.split(joiners, body)
        if not 1 <= len(items) <= 3 or render(style, items) != text:  # the joiners must be the style's own ("a, b and c")
            return None
        return style, count, items
    return None


def accepts(prompt: str, answer: str) -> bool:
    """The teacher's test: would it have written `answer` to `prompt`? A style's layout, the
    lead-in's count equal to the number of items, 1 to 3 items, each correct, none twice."""
    valid = valid_items(prompt)
    parsed = parse_answer(answer)
    if valid is None or parsed is None:
        return False
    _, count, items = parsed
    return (1 <= count <= 3 and count == len(items) and len(set(items)) == len(items)
            and all(i in valid for i in items))


# Files ----------------------------------------------------------------------------------------
def make_rows(n: int, seed: int, split: str, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` rows, none with a prompt in `exclude`, each with one teacher sample. Train repeats
    prompts (each time with a new sample: several answers to one prompt, as the black box
    gives them); the test splits' numeric prompts are distinct."""
    ood = split == "ood"
    families = OOD_FAMILIES if ood else ID_FAMILIES
    lo, hi = (OOD_MIN, OOD_MAX) if ood else (0, ID_MAX)
    rng = random.Random(f"gad-styles:{seed}:{split}")
    teacher = random.Random(f"gad-styles-teacher:{seed}:{split}")
    rows, seen, names = [], set(), list(families)
    tries = 0
    while len(rows) < n:
        family = names[len(rows) % len(names)]
        prompt = families[family](rng, lo, hi)
        tries += 1
        if tries > 200 * max(n, 1):
            raise ValueError(f"cannot draw {n} distinct prompts for split {split!r}")
        if prompt in exclude or (prompt in seen and split != "train" and family != "word"):
            continue  # train (and the small word family) repeat prompts, with new samples
        seen.add(prompt)
        rows.append({"id": f"{split}-{len(rows):06d}", "family": family,
                     "messages": [{"role": "user", "content": prompt}],
                     "teacher_response": teacher_respond(prompt, teacher)})
    return rows


def write_styles_task(out_dir: str | Path, n_train: int = 4000, n_test: int = 200,
                      n_ood: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl, test.jsonl (in distribution) and ood.jsonl under `out_dir`. The
    numeric prompts of the test split are not in train; ood's ranges are beyond train's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test = make_rows(n_test, seed, "test")
    held = {r["messages"][0]["content"] for r in test if r["family"] != "word"}
    splits = {"train": make_rows(n_train, seed, "train", exclude=held), "test": test,
              "ood": make_rows(n_ood, seed, "ood")}
    paths = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths
