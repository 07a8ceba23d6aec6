"""A built-in task's own acceptance test applied to training rollouts.

Black-box distillation has no such test in general; the built-in `styles` task does (the
teacher's `accepts`). It serves two purposes, both set in `reward.*`:
- measurement: how well D's scores separate accepted from rejected samples
  (`algorithms.oracle`), which no training-signal figure of D itself can show;
- an upper bound for the RL side: the verdict (1 accepted / 0 rejected) as the gad stage's
  reward (`reward.source=task`), the same GRPO update with a reward that is right.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from gad_megatron.data import styles_task

TASKS: dict[str, Callable[[str, str], bool]] = {
    "styles": lambda rendered, answer: styles_task.accepts(
        styles_task.task_prompt(rendered) or "", answer),
}
"""Task name -> accepts(rendered prompt text, answer text)."""


class TaskJudge:
    """Verdicts of `task`'s acceptance test on token-id sequences."""

    def __init__(self, task: str, tokenizer, eos_id: int) -> None:
        if task not in TASKS:
            raise ValueError(f"no acceptance test for task {task!r}; one of {sorted(TASKS)}")
        self.accepts, self.tokenizer, self.eos = TASKS[task], tokenizer, eos_id
        self._prompts: dict[bytes, str] = {}  # a batch repeats each prompt n times

    def _prompt_text(self, ids: np.ndarray) -> str:
        key = ids.tobytes()
        if key not in self._prompts:
            self._prompts[key] = self.tokenizer.decode([int(t) for t in ids],
                                                       skip_special_tokens=True)
        return self._prompts[key]

    def __call__(self, prompts, responses) -> np.ndarray:
        """One bool per (prompt ids, response ids) pair, the answer decoded as evaluation
        decodes it (trailing EOS and special tokens dropped)."""
        from gad_megatron.evaluation.pipeline import decode_answer

        if len(self._prompts) > 100_000:
            self._prompts.clear()
        return np.array([self.accepts(self._prompt_text(np.asarray(p)),
                                      decode_answer(self.tokenizer, r, self.eos))
                         for p, r in zip(prompts, responses)], dtype=bool)
