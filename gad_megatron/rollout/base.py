"""The rollout-engine protocol: what the controller and the weight sync need from an engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch


@dataclass
class Generation:
    """n samples for each of P prompts, flattened prompt-major: sample j of prompt i is at
    index i * n + j."""

    responses: list[list[int]]
    """Response token ids (no prompt); ends with EOS when the sample finished."""
    logprobs: list[list[float]]
    """The engine's log-prob of each response token (at the sampling temperature)."""
    group_index: list[int]
    """Index of each sample's prompt in the `prompts` argument."""
    finished: list[bool]
    """True when the sample ended with EOS, False when max_new_tokens cut it."""


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine whose weights the trainer can replace in place."""

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> Generation:
        """Sample n responses per prompt (prompt token ids, no padding)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors (any subset, in any number of calls)."""

    def sleep(self) -> None:
        """Release what memory the engine can (KV cache, weights) until `wake`."""

    def wake(self) -> None:
        """Undo `sleep`."""
