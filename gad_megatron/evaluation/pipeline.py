"""Evaluate a student on held-out teacher answers: greedy answers, then every metric.

    result = evaluate("runs/x/export/student", ["task/test.jsonl"], data_cfg, tokenizer,
                      max_new_tokens=64, discriminator=d, judge=j, builtin_task=True)
    write_report(result, "runs/x/eval")

Prompts go through the training data pipeline (same reader checks, same template, same
length policies), so the student is asked exactly what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from gad_megatron.evaluation.metrics import text_metrics, win_rate


class Discriminator(Protocol):
    def scores(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        """One score per (prompt, response) pair; higher means more teacher-like."""


@dataclass(frozen=True)
class EvalExample:
    """One test row: its texts (for metrics and the judge) and its token ids (for generation
    and the discriminator)."""

    key: str
    prompt: str  # the question as a person would read it (last user turn, or the prompt)
    messages: tuple[dict, ...]  # the whole conversation (what the judge is shown)
    teacher: str  # the teacher's answer text
    prompt_ids: list[int]  # the rendered prompt, as in training
    teacher_ids: list[int]  # the teacher answer's ids, EOS-terminated unless truncated


@dataclass(frozen=True)
class StudentAnswers:
    texts: list[str]  # decoded, EOS and special tokens removed
    ids: list[list[int]]  # as generated, trailing EOS kept (what D saw in training)
    finished: list[bool]  # ended with EOS (else cut at max_new_tokens)


def load_examples(test_files: Sequence[str], data_cfg, tokenizer,
                  limit: int | None = None) -> list[EvalExample]:
    """Read, check and encode the test files exactly as `build_dataset` does, keeping texts."""
    from gad_megatron.data import DataError, Encoder, iter_rows
    from gad_megatron.data.stats import DataStats

    if isinstance(test_files, str):
        test_files = [test_files]
    if not test_files:
        raise DataError("no test files given")
    encoder = Encoder(tokenizer, data_cfg)
    stats = DataStats(strict_rows=data_cfg.on_bad_row == "error",
                      max_messages=data_cfg.max_reported_errors)
    seen: dict[str, tuple[str, int]] = {}
    out: list[EvalExample] = []
    for path in test_files:
        for rows in iter_rows(str(path), data_cfg, stats, seen):
            by_key = {r.key: r for r in rows}
            # encode() drops rows a `skip` length policy rejects; keys tie the rest back.
            for enc in encoder.encode(rows, stats, strict_lengths=True):
                out.append(_example(by_key[enc.key], enc))
                if limit is not None and len(out) >= limit:
                    return out
    if not out:
        raise DataError(f"no usable rows in {', '.join(map(str, test_files))}:\n"
                        f"{stats.summary()}")
    return out


def _example(row, enc) -> EvalExample:
    if row.messages is not None:
        messages = tuple(dict(m) for m in row.messages)
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"),
                      messages[-1]["content"])
    else:
        prompt = row.prompt or ""
        messages = ({"role": "user", "content": prompt},)
    return EvalExample(row.key, prompt, messages, row.response,
                       [int(t) for t in enc.prompt_ids], [int(t) for t in enc.teacher_ids])


def generate_answers(engine, prompts: list[list[int]], tokenizer, eos: int,
                     max_new_tokens: int, batch_size: int = 16) -> StudentAnswers:
    """Greedy answers (temperature 0: the student's single most likely answer, so a report
    is reproducible), in batches to bound the engine's memory."""
    ids: list[list[int]] = []
    finished: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        gen = engine.generate(prompts[start:start + batch_size], n=1, temperature=0.0,
                              top_p=1.0, max_new_tokens=max_new_tokens, seed=0)
        ids.extend(list(r) for r in gen.responses)
        finished.extend(gen.finished)
    texts = [decode_answer(tokenizer, r, eos) for r in ids]
    return StudentAnswers(texts, ids, finished)


def strip_eos(ids: Sequence[int], eos: int) -> list[int]:
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] == eos else ids


def decode_answer(tokenizer, ids: Sequence[int], eos: int) -> str:
    # Special tokens a student emits (role markers, stray BOS) are not answer text.
    return tokenizer.decode(strip_eos(ids, eos), skip_special_tokens=True).strip()


def score_predictions(examples: Sequence[EvalExample], student: StudentAnswers, eos: int,
                      discriminator: Discriminator | None = None, judge=None,
                      builtin_task: bool = False, n_samples: int = 5) -> dict:
    """All metrics of given student answers; no model is loaded here."""
    teachers = [e.teacher for e in examples]
    metrics, rouge = text_metrics(
        student.texts, teachers, [len(strip_eos(r, eos)) for r in student.ids],
        [len(strip_eos(e.teacher_ids, eos)) for e in examples],
        [e.prompt for e in examples], builtin_task)
    n = max(len(student.finished), 1)
    metrics["finished_rate"] = sum(student.finished) / n
    rows = [{"key": e.key, "prompt": e.prompt, "teacher": e.teacher, "student": s,
             "finished": f, "rouge_l": r}
            for e, s, f, r in zip(examples, student.texts, student.finished, rouge)]
    if discriminator is not None:
        metrics["discriminator"] = _discriminator_metrics(discriminator, examples, student,
                                                          rows)
    if judge is not None:
        from gad_megatron.evaluation.judge import judge_answers

        metrics["judge"], per_row = judge_answers(
            judge, [_conversation_text(e.messages) for e in examples], student.texts, teachers)
        for row, verdict in zip(rows, per_row):
            row["judge"] = verdict
    return {"n": len(examples), "metrics": metrics, "samples": rows[:n_samples], "rows": rows}


def _discriminator_metrics(discriminator: Discriminator, examples, student, rows) -> dict:
    prompts = [e.prompt_ids for e in examples]
    # One call for both sides: D batches (and de-duplicates) better over the whole set.
    scores = [float(s) for s in discriminator.scores(
        prompts + prompts, list(student.ids) + [e.teacher_ids for e in examples])]
    if len(scores) != 2 * len(examples):
        raise ValueError(f"discriminator returned {len(scores)} scores for "
                         f"{2 * len(examples)} sequences")
    s_scores, t_scores = scores[:len(examples)], scores[len(examples):]
    for row, s, t in zip(rows, s_scores, t_scores):
        row["d_student"], row["d_teacher"] = s, t
    return win_rate(s_scores, t_scores)


def _conversation_text(messages: Sequence[dict]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    # Multi-turn: the judge needs the history to know what the last question refers to.
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def evaluate(student_hf_dir, test_files: Sequence[str], data_cfg, tokenizer,
             max_new_tokens: int, discriminator: Discriminator | None = None, judge=None,
             builtin_task: bool = False, *, engine: Any = None, batch_size: int = 16,
             limit: int | None = None, n_samples: int = 5) -> dict:
    """Generate the student's greedy answers to the test prompts and score them.

    `engine` replaces loading `student_hf_dir` with the hf rollout engine (tests, or a
    caller that already holds one). The result is a JSON-able dict: `metrics`, `samples`
    (the first `n_samples` rows), `rows` (every prompt with both answers) and the setup.
    """
    from gad_megatron.data import eos_id, pad_id

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every row), got {limit}")
    eos = eos_id(tokenizer, data_cfg.eos_token)
    examples = load_examples(test_files, data_cfg, tokenizer, limit)
    if engine is None:
        from gad_megatron.rollout import make_engine

        engine = make_engine("hf", str(student_hf_dir), eos_id=eos, pad_id=pad_id(tokenizer))
    student = generate_answers(engine, [e.prompt_ids for e in examples], tokenizer, eos,
                               max_new_tokens, batch_size)
    result = score_predictions(examples, student, eos, discriminator, judge, builtin_task,
                               n_samples)
    result["setup"] = {"student": str(student_hf_dir), "test_files": [str(f) for f in test_files],
                       "max_new_tokens": max_new_tokens, "decoding": "greedy",
                       "template": data_cfg.template, "builtin_task": builtin_task,
                       "discriminator": getattr(discriminator, "name", None),
                       "judge": getattr(judge, "name", None)}
    return result
