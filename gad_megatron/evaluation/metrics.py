"""Metrics of student answers against the teacher's, each a plain function of texts/scores.

Everything here is deterministic and needs no model, so the numbers in a report can be
checked by hand (tests/test_eval_metrics.py does).
"""

from __future__ import annotations

import statistics
from typing import Sequence


def _rouge_scorer():
    from rouge_score import rouge_scorer

    # No stemming: the teacher's exact wording is what the student imitates, and the
    # Porter stemmer would also make scores depend on an English-only heuristic.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference, in [0, 1].

    `rouge_score` lower-cases and splits on non-alphanumerics, so punctuation-only
    differences do not count and an answer without any word scores 0.
    """
    _same_length(preds, refs)
    scorer = _rouge_scorer()
    return [float(scorer.score(ref, pred)["rougeL"].fmeasure) for pred, ref in zip(preds, refs)]


def win_rate(student_scores: Sequence[float], teacher_scores: Sequence[float]) -> dict:
    """How often the discriminator rates the student's answer at least as high as the
    teacher's to the same prompt (ties count as wins: D cannot tell them apart)."""
    _same_length(student_scores, teacher_scores)
    n = len(student_scores)
    if n == 0:
        return {"n": 0, "win_rate": 0.0, "mean_student_score": 0.0,
                "mean_teacher_score": 0.0, "mean_gap": 0.0}
    wins = sum(s >= t for s, t in zip(student_scores, teacher_scores))
    ms, mt = sum(student_scores) / n, sum(teacher_scores) / n
    return {"n": n, "win_rate": wins / n, "mean_student_score": ms,
            "mean_teacher_score": mt, "mean_gap": ms - mt}


def _summary(values: Sequence[float]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0}
    return {"mean": float(statistics.fmean(values)), "median": float(statistics.median(values))}


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def length_stats(student_tokens: Sequence[int], teacher_tokens: Sequence[int],
                 student_texts: Sequence[str], teacher_texts: Sequence[str]) -> dict:
    """Mean/median length of the student's and the teacher's answers, in tokens (EOS not
    counted) and characters, and the student/teacher ratio of the means."""
    _same_length(student_tokens, teacher_tokens)
    _same_length(student_texts, teacher_texts)
    out = {
        "student_tokens": _summary(student_tokens), "teacher_tokens": _summary(teacher_tokens),
        "student_chars": _summary([len(t) for t in student_texts]),
        "teacher_chars": _summary([len(t) for t in teacher_texts]),
    }
    out["token_ratio"] = _ratio(out["student_tokens"]["mean"], out["teacher_tokens"]["mean"])
    out["char_ratio"] = _ratio(out["student_chars"]["mean"], out["teacher_chars"]["mean"])
    return out


def task_scores(preds: Sequence[str], refs: Sequence[str], prompts: Sequence[str]) -> dict:
    """The built-in task's exact match / similarity / answer accuracy, overall and per
    family (a family the student never gets right stands out in the per-family table)."""
    from gad_megatron.data.task import score_answers, teacher_family

    _same_length(preds, prompts)
    out = dict(score_answers(preds, refs))
    by_family: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_family.setdefault(teacher_family(prompt) or "unknown", []).append(i)
    out["by_family"] = {
        fam: score_answers([preds[i] for i in idx], [refs[i] for i in idx])
        for fam, idx in sorted(by_family.items())}
    return out


def text_metrics(preds: Sequence[str], refs: Sequence[str], student_tokens: Sequence[int],
                 teacher_tokens: Sequence[int], prompts: Sequence[str] | None = None,
                 builtin_task: bool = False) -> tuple[dict, list[float]]:
    """Every metric that needs only the answers: (metrics, per-row ROUGE-L)."""
    rouge = rouge_l(preds, refs)
    metrics = {"n": len(refs), "rouge_l": float(statistics.fmean(rouge)) if rouge else 0.0,
               "length": length_stats(student_tokens, teacher_tokens, preds, refs)}
    if builtin_task:
        if prompts is None:
            raise ValueError("builtin_task scores need the prompts (for the per-family split)")
        metrics["task"] = task_scores(preds, refs, prompts)
    return metrics, rouge


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} student values but {len(b)} teacher values")
