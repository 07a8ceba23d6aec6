"""Extra negatives for D's Bradley-Terry update, made from teacher text alone.

Black-box distillation knows nothing of the task but the teacher's answers, so these use
nothing else: no task rule, no answer key. Each turns a teacher answer (token ids) into a
nearby answer the teacher would not write, which D must score below the real one:

- `splice`:   the head of one teacher answer for the prompt, the tail of another (the
              mode-mixing that SFT shows at temperature: two answer styles glued together);
- `truncate`: a teacher answer cut short (then closed with EOS, so the end token alone does
              not give it away);
- `swap`:     a teacher answer with two disjoint spans exchanged;
- `mismatch`: the teacher's answer to *another* prompt of the batch, paired with this
              prompt (the "matching-aware" negative of conditional GANs, GAN-CLS, Reed et
              al. 2016): well-formed text that is wrong for the prompt, which pushes D to read
              the prompt, where a student's wrong-but-fluent answers are told apart.

A candidate equal to the teacher answer it replaces carries no information (BT's gap would
be 0) and is dropped. Every draw comes from the generator passed in, so a step's negatives
are a function of its seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KINDS = ("splice", "truncate", "swap", "mismatch")


def _split_eos(ids: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(body, trailing EOS as a 0- or 1-token array)."""
    if len(ids) and ids[-1] == eos:
        return ids[:-1], ids[-1:]
    return ids, ids[:0]


def splice(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, eos: int) -> np.ndarray:
    """a's body up to a cut in [1, len-1], then b's body from a cut in [1, len-1], then a's
    EOS. With a == b the cuts differ, so a span is dropped or repeated."""
    body_a, end = _split_eos(a, eos)
    body_b, _ = _split_eos(b, eos)
    if len(body_a) < 2 or len(body_b) < 2:
        return a
    i = int(rng.integers(1, len(body_a)))
    j = int(rng.integers(1, len(body_b)))
    return np.concatenate([body_a[:i], body_b[j:], end])


def truncate(a: np.ndarray, rng: np.random.Generator, eos: int) -> np.ndarray:
    """a's body cut to a length in [1, len-1], closed with a's EOS."""
    body, end = _split_eos(a, eos)
    if len(body) < 2:
        return a
    return np.concatenate([body[:int(rng.integers(1, len(body)))], end])


def swap_spans(a: np.ndarray, rng: np.random.Generator, eos: int) -> np.ndarray:
    """a's body with two non-empty spans [i, j) and [k, l), i < j < k < l, exchanged; a
    body of 2 tokens has its halves exchanged."""
    body, end = _split_eos(a, eos)
    if len(body) < 2:
        return a
    if len(body) < 3:
        return np.concatenate([body[1:], body[:1], end])
    i, j, k, l = np.sort(rng.choice(len(body) + 1, size=4, replace=False))
    return np.concatenate([body[:i], body[k:l], body[j:k], body[i:j], body[l:], end])


def make_negatives(prompts: Sequence[np.ndarray], answers: Sequence[np.ndarray],
                   kinds: Sequence[str], per_kind: int, rng: np.random.Generator, eos: int,
                   partners: Sequence[Sequence[np.ndarray]] | None = None
                   ) -> tuple[list[np.ndarray], list[int]]:
    """Negatives for a batch of G prompts with one teacher answer each: (responses, group),
    group g pairing a negative with prompt g's teacher answer. `partners[g]`: other teacher
    answers to prompt g (for `splice`; none: the answer itself, cut twice)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown negative kinds {unknown}; choose from {list(KINDS)}")
    out, group = [], []
    n = len(answers)
    for g, answer in enumerate(answers):
        for kind in kinds:
            for _ in range(per_kind):
                if kind == "splice":
                    pool = list(partners[g]) if partners is not None and partners[g] else []
                    other = pool[int(rng.integers(len(pool)))] if pool else answer
                    cand = splice(answer, other, rng, eos)
                elif kind == "truncate":
                    cand = truncate(answer, rng, eos)
                elif kind == "swap":
                    cand = swap_spans(answer, rng, eos)
                else:  # mismatch: another prompt's answer, unless the prompts are the same
                    if n < 2:
                        continue
                    h = int(rng.integers(n - 1))
                    h += h >= g
                    if np.array_equal(prompts[h], prompts[g]):
                        continue
                    cand = answers[h]
                if not np.array_equal(cand, answer):
                    out.append(np.asarray(cand, dtype=np.int32))
                    group.append(g)
    return out, group


class TeacherPool:
    """Every teacher answer of the training data, by prompt: the other samples of the same
    prompt that `splice` draws its partners from (a black-box teacher asked twice)."""

    def __init__(self, dataset) -> None:
        self._by_prompt: dict[bytes, list[np.ndarray]] = {}
        for i in range(len(dataset)):
            key = np.asarray(dataset.prompt_ids(i), np.int32).tobytes()
            self._by_prompt.setdefault(key, []).append(dataset.teacher_ids(i))

    def others(self, prompt: np.ndarray, answer: np.ndarray) -> list[np.ndarray]:
        """The prompt's teacher answers other than `answer`."""
        key = np.asarray(prompt, np.int32).tobytes()
        return [a for a in self._by_prompt.get(key, []) if not np.array_equal(a, answer)]
