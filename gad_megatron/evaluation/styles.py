"""Evaluation on the styles task (data/styles_task.py), as the paper evaluates: the student's
answers sampled at temperature 0.8 and its greedy answer, each judged by the teacher's own
acceptance test; ROUGE-L against the one teacher sample in the file is reported beside it
(not the headline: with several right answers per prompt it rewards copying one of them).
"""

from __future__ import annotations

from typing import Sequence

from gad_megatron.data.styles_task import accepts
from gad_megatron.evaluation.metrics import rouge_l

METRICS = ("accept_sampled", "accept_greedy", "rouge_l_sampled")
"""Keys of `score_split`'s result (each a corpus mean in [0, 1])."""


def score_split(prompts: Sequence[str], teacher: Sequence[str],
                sampled: Sequence[Sequence[str]], greedy: Sequence[str]) -> dict[str, float]:
    """Acceptance rates of the sampled answers (all of them pooled) and of the greedy
    answers, and the sampled answers' mean ROUGE-L F1 against the teacher's sample."""
    if not len(prompts) == len(teacher) == len(sampled) == len(greedy) or not prompts:
        raise ValueError("score_split needs one teacher answer, one list of samples and one "
                         "greedy answer per prompt (and at least one prompt)")
    flat = [(p, t, a) for p, t, answers in zip(prompts, teacher, sampled) for a in answers]
    if not flat:
        raise ValueError("score_split: no sampled answers")
    ok = [accepts(p, a) for p, _, a in flat]
    rouge = rouge_l([a for _, _, a in flat], [t for _, t, _ in flat])
    return {"accept_sampled": sum(ok) / len(ok),
            "accept_greedy": sum(accepts(p, g) for p, g in zip(prompts, greedy)) / len(prompts),
            "rouge_l_sampled": sum(rouge) / len(rouge)}


def evaluate_split(engine, examples, tokenizer, eos: int, *, n_samples: int = 4,
                   temperature: float = 0.8, max_new_tokens: int = 48, seed: int = 0,
                   batch_size: int = 16) -> dict[str, float]:
    """Generate `n_samples` answers at `temperature` and the greedy answer to every example
    (evaluation.pipeline.EvalExample) with `engine`, then `score_split` them. The sampling
    seed is fixed per batch, so the figures are a function of the weights alone."""
    from gad_megatron.evaluation.pipeline import decode_answer, generate_answers

    prompts = [e.prompt_ids for e in examples]
    sampled: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        gen = engine.generate(prompts[start:start + batch_size], n=n_samples,
                              temperature=temperature, top_p=1.0,
                              max_new_tokens=max_new_tokens, seed=seed + start)
        texts = [decode_answer(tokenizer, r, eos) for r in gen.responses]  # prompt-major
        sampled.extend(texts[i:i + n_samples] for i in range(0, len(texts), n_samples))
    greedy = generate_answers(engine, prompts, tokenizer, eos, max_new_tokens, batch_size)
    return score_split([e.prompt for e in examples], [e.teacher for e in examples], sampled,
                       greedy.texts)
