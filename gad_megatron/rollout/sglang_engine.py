"""SGLang as the rollout engine: a thin adapter over SGLang's offline `sglang.Engine`.

EXTERNAL BOUNDARY. This module drives a package we cannot install or run on CPU, so nothing
here is exercised by the CPU test suite; `tests/test_rollout_gpu_engines.py` (marked gpu)
checks it where SGLang and a GPU are present. SGLang is imported lazily, inside the methods,
so importing this module never needs sglang.

Choices, and why:
- Token ids in (`input_ids=`), token ids out (`output_ids`): no detokenise round trip.
- The n samples of a prompt are sent as n copies of the request, in prompt-major order, so
  the result order is ours by construction; each copy gets its own sampling seed
  (seed + index) so a call is reproducible and the copies differ.
- Log-probs come from `meta_info["output_token_logprobs"]` (`return_logprob=True`), one
  (logprob, token_id, text) triple per generated token. SGLang computes them from the
  temperature-scaled logits (unless SGLANG_RETURN_ORIGINAL_LOGPROB is set), before top-p.
- Weights: `update_weights_from_tensor` takes HF-named full tensors; each engine-TP rank cuts
  its own shard in the model's `load_weights`, so every rank receives every tensor.
  `flush_cache=True` drops radix-cache KV blocks computed with the old weights.
- SGLang 0.5.23 loads tensors only inside a weight-update session: `update_weights_from_tensor`
  outside `begin_weight_update()` / `end_weight_update()` fails, and the engine keeps its old
  weights. Each bucket is loaded in a session of its own (begin, load, end), and the
  `(success, message)` answer of every call is checked: a failure raises `EngineCallFailed`
  instead of training on against stale weights.
- Sleep: `enable_memory_saver` lets `release_memory_occupation` free the weights and KV cache;
  without `enable_weights_cpu_backup` the freed weights come back as garbage on resume. The
  backup is on, so a wake restores the weights of the last sync (and the trainer's sync also
  always comes after a wake; see rollout/managed.py).
- Seeds: SGLang honours the per-request `sampling_seed` only with deterministic inference on
  (`enable_deterministic_inference`); `deterministic=True` (rollout.deterministic) turns it on.
"""

from __future__ import annotations

from typing import Iterable

import torch

from gad_megatron.rollout.base import Generation


class EngineCallFailed(RuntimeError):
    """SGLang answered a control call (weight update, session) with success=False."""


def check_answer(what: str, answer) -> None:
    """Raise EngineCallFailed when an SGLang control call reports failure.

    SGLang's Engine answers weight calls with the tokenizer manager's `(success, message)`;
    some calls answer with an output object or dict carrying `success`, some with None (no
    status to check).
    """
    if answer is None:
        return
    if isinstance(answer, tuple) and answer and isinstance(answer[0], bool):
        ok, message = answer[0], (answer[1] if len(answer) > 1 else "")
    elif isinstance(answer, dict) and "success" in answer:
        ok, message = answer["success"], answer.get("message", "")
    elif hasattr(answer, "success"):
        ok, message = answer.success, getattr(answer, "message", "")
    else:
        return
    if not ok:
        raise EngineCallFailed(f"sglang {what} failed: {message}")


class SGLangEngine:
    """`sglang.Engine` behind the RolloutEngine protocol."""

    def __init__(self, model_path: str, tp: int = 1, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.5, eos_id: int | None = None,
                 pad_id: int | None = None, deterministic: bool = True, **engine_kwargs):
        import sglang

        self.eos_id, self.pad_id = eos_id, pad_id
        self.model_path, self.dtype = str(model_path), dtype
        self.engine = sglang.Engine(**engine_args(model_path, tp, dtype, gpu_memory_utilization,
                                                  deterministic, engine_kwargs))
        self._asleep = False

    def _sampling_params(self, temperature: float, top_p: float, max_new_tokens: int,
                         seed: int) -> dict:
        greedy = temperature == 0.0
        params = {"temperature": float(temperature), "top_p": 1.0 if greedy else float(top_p),
                  "top_k": -1, "max_new_tokens": max_new_tokens, "sampling_seed": seed,
                  "skip_special_tokens": False}
        if self.eos_id is not None:
            params["stop_token_ids"] = [self.eos_id]
        return params

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> Generation:
        ids = [p for p in prompts for _ in range(n)]  # prompt-major: row i*n+j
        params = [self._sampling_params(temperature, top_p, max_new_tokens, seed + k)
                  for k in range(len(ids))]
        outs = self.engine.generate(input_ids=ids, sampling_params=params, return_logprob=True)
        responses, logprobs, finished = [], [], []
        for out in outs:
            meta = out["meta_info"]
            responses.append(list(out["output_ids"]))
            logprobs.append([float(lp) for lp, _tok, _text in meta["output_token_logprobs"]])
            finished.append((meta.get("finish_reason") or {}).get("type") == "stop")
        group = [k // n for k in range(len(ids))]
        return Generation(responses=responses, logprobs=logprobs, group_index=group,
                          finished=finished)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self._asleep:
            raise RuntimeError("sglang: update_weights while asleep (wake first)")
        bucket = [(name, t.detach()) for name, t in named_tensors]
        check_answer("begin_weight_update", self.engine.begin_weight_update())
        try:
            check_answer("update_weights_from_tensor", self.engine.update_weights_from_tensor(
                named_tensors=bucket, flush_cache=True))
        finally:
            check_answer("end_weight_update", self.engine.end_weight_update())

    def weight_manifest(self) -> dict:
        """name -> (shape, dtype name) of the weights a sync must send: the checkpoint's
        tensors, in the dtype the engine runs (it casts what it loads)."""
        from gad_megatron.rollout.receiver import checkpoint_manifest

        return checkpoint_manifest(self.model_path, self.dtype)

    def sleep(self) -> None:
        # Frees weights and KV cache memory (torch_memory_saver); the weights are backed up
        # on the host (enable_weights_cpu_backup) and come back on resume.
        if not self._asleep:
            check_answer("release_memory_occupation", self.engine.release_memory_occupation())
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            check_answer("resume_memory_occupation", self.engine.resume_memory_occupation())
            self._asleep = False


def engine_args(model_path: str, tp: int, dtype: str, gpu_memory_utilization: float,
                deterministic: bool, extra: dict) -> dict:
    """`sglang.Engine(**...)` (ServerArgs names): token ids in and out, sleepable with the
    weights backed up, seeds honoured when `deterministic`."""
    args = {"model_path": str(model_path), "tp_size": tp, "dtype": dtype,
            "mem_fraction_static": gpu_memory_utilization, "skip_tokenizer_init": True,
            "enable_memory_saver": True, "enable_weights_cpu_backup": True,
            "enable_deterministic_inference": deterministic}
    return {**args, **extra}
