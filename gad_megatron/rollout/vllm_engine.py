"""vLLM as the rollout engine: a thin adapter over vLLM's offline `LLM` API.

EXTERNAL BOUNDARY. This module drives a package we cannot install or run on CPU, so nothing
here is exercised by the CPU test suite; `tests/test_rollout_gpu_engines.py` (marked gpu)
checks it where vLLM and a GPU are present. vLLM is imported lazily, inside the methods, so
importing this module never needs vllm.

Choices, and why:
- Prompts go in as token ids (`TokensPrompt`) and come back as token ids: the tokenizer is the
  trainer's business, and a detokenise/retokenise round trip is not always the identity.
- `logprobs_mode="processed_logprobs"`: vLLM's default reports log-probs of the raw logits
  (temperature 1); processed log-probs are taken after temperature scaling, matching the
  trainer's recompute at the sampling temperature. vLLM applies them after top-p/top-k too,
  so with top_p < 1 they are renormalised over the nucleus (the HF engine reports them
  before truncation); with top_p == 1 the two agree.
- Weights: vLLM loads HF-named full tensors with the model's own `load_weights`, which cuts
  each engine-TP rank's shard itself. Every worker therefore receives every tensor of a
  bucket (through `collective_rpc`); the prefix cache is reset afterwards because its
  KV blocks were computed with the old weights.
"""

from __future__ import annotations

from typing import Iterable

import torch

from gad_megatron.rollout.base import Generation


def _load_bucket_on_worker(worker, bucket):
    # Runs inside each vLLM worker process (collective_rpc passes the worker as `self`).
    worker.model_runner.model.load_weights(weights=bucket)
    return len(bucket)


class VLLMEngine:
    """`vllm.LLM` behind the RolloutEngine protocol."""

    def __init__(self, model_path: str, tp: int = 1, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.5, eos_id: int | None = None,
                 pad_id: int | None = None, enable_sleep_mode: bool = True, **llm_kwargs):
        import os

        from vllm import LLM

        # collective_rpc ships a Python callable to the workers; vLLM V1 refuses to pickle
        # callables unless this is set (the callable is ours, not user input).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.eos_id, self.pad_id = eos_id, pad_id
        self.llm = LLM(model=str(model_path), tensor_parallel_size=tp, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=enable_sleep_mode, logprobs_mode="processed_logprobs",
                       # "vllm": ignore the checkpoint's generation_config.json defaults
                       # (top_k, repetition_penalty...), which would change the distribution.
                       generation_config="vllm", **llm_kwargs)
        self._asleep = False

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = temperature == 0.0
        params = SamplingParams(n=n, temperature=float(temperature), top_p=1.0 if greedy
                                else float(top_p), top_k=-1,
                                max_tokens=max_new_tokens, seed=seed, logprobs=0,
                                stop_token_ids=[self.eos_id] if self.eos_id is not None else None,
                                ignore_eos=False, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False)
        return _to_generation(outs, n)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        bucket = [(name, t.detach()) for name, t in named_tensors]
        # One answer per worker: each must have loaded the whole bucket.
        answers = self.llm.collective_rpc(_load_bucket_on_worker, args=(bucket,))
        if list(answers) != [len(bucket)] * len(answers) or not answers:
            raise RuntimeError(f"vLLM workers loaded {list(answers)} of {len(bucket)} tensors")
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")

    def sleep(self) -> None:
        # level 1: weights to host memory, KV cache dropped; weights survive for `wake`.
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


def _to_generation(outs, n: int) -> Generation:
    """vLLM RequestOutputs (one per prompt, n completions each) -> prompt-major Generation."""
    responses, logprobs, group, finished = [], [], [], []
    for i, req in enumerate(outs):
        if len(req.outputs) != n:
            raise RuntimeError(f"vLLM returned {len(req.outputs)} samples for prompt {i}, "
                               f"expected {n}")
        for comp in sorted(req.outputs, key=lambda c: c.index):
            ids = list(comp.token_ids)
            responses.append(ids)
            # logprobs=0: one {token_id: Logprob} dict per step, holding the sampled token.
            logprobs.append([step[tok].logprob for step, tok in zip(comp.logprobs, ids)])
            group.append(i)
            finished.append(comp.finish_reason == "stop")
    return Generation(responses=responses, logprobs=logprobs, group_index=group,
                      finished=finished)
