"""`make bench` sections about moving data, not computing on it (bench.py runs them).

- movement: the controller's side of one gad step at the paper's batch shape (256 prompts x
  8 samples of ~3.5K tokens, synthetic), roles at TP=2 x DP=4 as on one 8-GPU node: the
  shards each role call sends, serialised as Ray does (pickle protocol 5, array buffers out
  of band and copied once into the object store), and the per-sequence results merged back.
  'before': what the code sent until issue 11, token ids and per-token fields as Python
  lists, every rank's arguments serialised separately (emulated: each shard is turned into
  that form first, and the time of turning it is left out); 'after': int32/float32 arrays
  (workers/sequences.py), one copy per DP replica shared by its TP/PP ranks
  (cluster/group.py). Worker-side work (deserialising arguments, serialising results) is
  not counted: it runs in parallel on the workers.
- packing: one actor forward+backward over variable-length sequences of a small Qwen2
  shape (PACK_MODEL), padded micro-batches vs packed (THD), real tokens per second.
"""

from __future__ import annotations

import pickle
import statistics
import time

import numpy as np

TP, DP = 2, 4  # one 8-GPU node: each role's replica is a TP pair


def _serialize(obj) -> int:
    """Ray's controller-side cost of passing `obj` to a task: pickle 5 with out-of-band
    buffers, then the buffers copied into the object store. Returns the bytes."""
    buffers: list = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return len(head) + sum(len(bytes(b.raw())) for b in buffers)


class _SerializingGroup:
    """A role's ranks as the controller sees them through Ray, for measuring only: each
    call serialises its arguments like Ray and answers with prepared results."""

    def __init__(self, answers: dict, share: bool):
        self.answers, self.share = answers, share
        self.bytes, self.left_out = 0, 0.0

    def _as_lists(self, args: tuple) -> tuple:
        """A shard in the form the code sent before (lists); its making is not timed."""
        start = time.perf_counter()
        seqs = args[0]
        fields = {k: v.tolist() if isinstance(v, np.ndarray) else
                  [x.tolist() if isinstance(x, np.ndarray) else x for x in v]
                  for k, v in seqs.fields.items()}
        legacy = ([p.tolist() for p in seqs.prompts], [r.tolist() for r in seqs.responses],
                  list(seqs.group), fields)
        self.left_out += time.perf_counter() - start
        return (legacy,) + args[1:]

    def call_per_rank_async(self, method: str, args_per_rank: list[tuple]) -> list:
        seen: set[int] = set()
        for args in args_per_rank:
            if self.share and id(args[0]) in seen:
                continue  # the replica's shard was put once; its other ranks get the ref
            seen.add(id(args[0]))
            self.bytes += _serialize(args if self.share else self._as_lists(args))
        # Results come back pickled by the workers (their work: not timed); the controller
        # unpickles each.
        start = time.perf_counter()
        blobs = [self.answers[method](args[0]) for args in args_per_rank]
        self.left_out += time.perf_counter() - start
        return [pickle.loads(b) for b in blobs]

    def wait(self, handles: list, call: str | None = None) -> list:
        return handles

    def call_per_rank(self, method: str, args_per_rank: list[tuple]) -> list:
        return self.call_per_rank_async(method, args_per_rank)


def paper_batch(seed: int = 0, prompts: int = 256, n: int = 8):
    """Prompt ids (numpy, as the loader gives them) and the engine's responses (lists)."""
    rng = np.random.default_rng(seed)
    prompt_ids = [rng.integers(0, 151936, rng.integers(1536, 2049)).astype(np.int64)
                  for _ in range(prompts)]
    responses = [rng.integers(0, 151936, rng.integers(1024, 2049)).tolist()
                 for _ in range(prompts * n)]
    group = [g for g in range(prompts) for _ in range(n)]
    return prompt_ids, responses, group


def controller_side(prompt_ids, responses, group, arrays: bool) -> tuple[float, int]:
    """Seconds and bytes of the controller's data work in one gad step (no model)."""
    import torch

    from gad_megatron import algorithms as alg
    from gad_megatron.config.schema import ParallelConfig
    from gad_megatron.rollout.base import Generation
    from gad_megatron.trainer.roles import Role
    from gad_megatron.trainer.steps import bt_pairs, generated_sequences, teacher_sequences
    from gad_megatron.workers.sequences import prompt_minibatches

    par = ParallelConfig(tp=TP, pp=1, dp=DP)
    rng = np.random.default_rng(1)
    per_token = {"logprobs": lambda s: pickle.dumps(
        [rng.standard_normal(len(r)).astype(np.float32) for r in s.responses], protocol=5),
        "scores": lambda s: pickle.dumps(rng.standard_normal(len(s)).astype(np.float32)),
        "policy_step": lambda s: pickle.dumps({"pg_loss": 0.0}),
        "bt_step": lambda s: pickle.dumps({"d_loss": 0.0})}
    groups = [_SerializingGroup(per_token, share=arrays) for _ in range(3)]
    actor, ref, disc = (Role(name, g, par) for name, g in zip(("actor", "ref", "disc"), groups))

    n = len(responses) // len(prompt_ids)

    class _Batch:  # what the loader hands the step
        teacher_ids = [np.asarray(r[:512]) for r in responses[::n]]

    _Batch.prompt_ids = prompt_ids
    gen = Generation(responses=responses,  # lists, as the engines give them
                     logprobs=[rng.standard_normal(len(r)).tolist() for r in responses],
                     group_index=list(group), finished=[True] * len(responses))
    start = time.perf_counter()
    # What steps.sample does with the engine's lists (both variants: the "before" shards
    # are turned back into lists when sent, untimed).
    samples = generated_sequences(_Batch, gen)
    teacher = teacher_sequences(_Batch)
    old = actor.map_sequences("logprobs", samples, 1.0)
    ref_lp = ref.map_sequences("logprobs", samples, 1.0)
    rewards = np.concatenate([disc.map_sequences("scores", teacher),
                              disc.map_sequences("scores", samples)])[len(teacher):]
    adv = alg.grpo_advantages(torch.from_numpy(np.asarray(rewards, np.float32)),
                              torch.tensor(samples.group))
    samples.fields.update(advantage=adv.numpy(), old_logprobs=old, ref_logprobs=ref_lp)
    disc.train("bt_step", bt_pairs(teacher, samples), len(samples))
    for part in prompt_minibatches(samples, 64):
        actor.train("policy_step", part, 1.0, 1.0)
    left_out = sum(g.left_out for g in groups)
    return time.perf_counter() - start - left_out, sum(g.bytes for g in groups)


def bench_movement(repeats: int = 2) -> None:
    batch = paper_batch()
    n = len(batch[1]) // len(batch[0])
    seqs, toks = len(batch[1]), sum(len(p) for p in batch[0]) * n + sum(map(len, batch[1]))
    runs = {}
    for label, arrays in (("before", False), ("after", True)):
        results = [controller_side(*batch, arrays=arrays) for _ in range(repeats)]
        runs[label] = min(r[0] for r in results), results[0][1]
        print(f"movement {label:<6} {runs[label][0]:6.2f} s/step controller-side, "
              f"{runs[label][1] / 1e9:5.2f} GB serialised ({seqs} sequences, "
              f"{toks / 1e6:.1f}M tokens, TP={TP} x DP={DP} per role)")
    print(f"movement after/before: {runs['after'][0] / runs['before'][0]:.2f}x the time, "
          f"{runs['after'][1] / runs['before'][1]:.2f}x the bytes")


PACK_MODEL = {  # a small Qwen2 shape: MLP and attention both matter at these lengths
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 8192,
    "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "torch_dtype": "float32", "eos_token_id": 2,
}


def _packing_rank(rank: int, world: int, model_dir: str, lengths: list[int], budget: int,
                  iters: int) -> dict:
    from gad_megatron.bench_gpu_paths import random_sequences
    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.models.builder import build_gpt
    from gad_megatron.models.forward import model_inputs
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.models.logprobs import micro_batch_logprobs
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed, shutdown
    from gad_megatron.workers.sequences import micro_batches

    init_distributed(ParallelLayout())
    try:
        arch = read_hf_config(model_dir)
        model = build_gpt(arch, 1, 1)
        load_hf_weights(model, arch, model_dir)
        seqs = random_sequences(lengths, arch.vocab_size, prompt_len=16)
        out = {}
        for packed in (False, True):
            mbs = micro_batches(seqs, budget, pad_id=0, packed=packed)
            times = []
            for _ in range(iters + 1):  # the first pass warms allocator and kernels up
                start = time.perf_counter()
                for mb in mbs:
                    logits = model(**model_inputs(mb))
                    micro_batch_logprobs(logits, mb, arch.vocab_size).sum().backward()
                times.append(time.perf_counter() - start)
            fed = sum(mb.tokens.numel() for mb in mbs)
            out["packed" if packed else "padded"] = (statistics.median(times[1:]), fed, len(mbs))
        return out
    finally:
        shutdown()


def bench_packing(iters: int = 3, budget: int = 2048) -> None:
    import tempfile

    import torch
    import transformers as tf

    from gad_megatron.parallel.launch import spawn_ranks

    # Long-tailed lengths, as sampled answers are: many short, a few near the budget.
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.exponential(300, 48), 48, budget).astype(int).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(tf.Qwen2Config(**PACK_MODEL)).save_pretrained(
            tmp, safe_serialization=True)
        (out,) = spawn_ranks(_packing_rank, 1, args=(tmp, lengths, budget, iters),
                             timeout_s=900)
    real = sum(lengths)
    for label in ("padded", "packed"):
        secs, fed, n_mb = out[label]
        print(f"packing {label}: {real / secs:8.0f} real tokens/s forward+backward "
              f"({n_mb} micro-batches of <= {budget} tokens; {fed} tokens fed for {real} "
              f"real, {1 - real / fed:.0%} padding)")
    print(f"packing packed/padded: {out['padded'][0] / out['packed'][0]:.2f}x the tokens/s "
          f"(CPU, local spec: attention sequence by sequence)")
