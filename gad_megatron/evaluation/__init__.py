"""Evaluate a distilled student against the teacher's held-out answers.

    result = evaluate(student_hf_dir, ["test.jsonl"], data_cfg, tokenizer, max_new_tokens=64,
                      discriminator=WorkerDiscriminator(ckpt, pad, eos),
                      judge=OpenAIJudge("http://127.0.0.1:8000/v1", "judge-model"),
                      builtin_task=True)
    json_path, md_path = write_report(result, "runs/x/eval")

Metrics: ROUGE-L F1 vs the teacher, length statistics, the discriminator's win-rate, the
built-in task's scores, and an optional LLM judge. See docs/evaluation.md.
"""

from gad_megatron.evaluation.judge import JudgeError, OpenAIJudge, judge_answers, parse_ratings
from gad_megatron.evaluation.metrics import (
    length_stats, rouge_l, task_scores, text_metrics, win_rate)
from gad_megatron.evaluation.pipeline import (
    Discriminator, EvalExample, StudentAnswers, evaluate, generate_answers, load_examples,
    score_predictions)
from gad_megatron.evaluation.report import console_table, to_markdown, write_report


def __getattr__(name: str):
    # The worker adapter pulls in Megatron; import it only when asked for.
    if name == "WorkerDiscriminator":
        from gad_megatron.evaluation.discriminator import WorkerDiscriminator

        return WorkerDiscriminator
    raise AttributeError(name)


__all__ = [
    "Discriminator", "EvalExample", "JudgeError", "OpenAIJudge", "StudentAnswers",
    "WorkerDiscriminator", "console_table", "evaluate", "generate_answers", "judge_answers",
    "length_stats", "load_examples", "parse_ratings", "rouge_l", "score_predictions",
    "task_scores", "text_metrics", "to_markdown", "win_rate", "write_report",
]
