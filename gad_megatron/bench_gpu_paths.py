"""The data-path checks of `make bench-gpu` (issue 11, item 6); bench_gpu.py runs them.

- sync: actor -> engine weight sync of Qwen2.5-1.5B's shape in bf16 on one GPU (Megatron
  model to an HF engine in the same process, the in-process transport: the device has one
  GPU, and NCCL takes no two ranks on one GPU), GB/s against a device-to-device copy of the
  same bytes (the floor any sync pays).
- throughput: forward-only log-probs (actor/reference) and discriminator scores over
  packed micro-batches of mixed lengths, tokens per second.
- parity: the GPU parity tests (`make test-gpu`: pytest -m gpu), their summary line.

`packed_lengths` and `random_sequences` also give the MFU check (and bench_data's packing
section) their mixed-length batches.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import numpy as np


def packed_lengths(total: int, seq: int, seed: int = 0) -> list[int]:
    """Sequence lengths summing to `total`, each in [seq/4, 2 seq): a packed batch of mixed
    lengths like sampled answers (the last one takes the remainder)."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(max(1, seq // 4), 2 * seq)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < 1:
        lengths.pop()
        lengths[-1] += total - sum(lengths)
    return lengths


def random_sequences(lengths: list[int], vocab: int, prompt_len: int, seed: int = 0):
    """Sequences of the given total lengths, each a `prompt_len`-token prompt and the rest
    response, with uniform random token ids (the benches' synthetic batches)."""
    from gad_megatron.workers.sequences import Sequences

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, prompt_len) for _ in lengths]
    return Sequences(prompts, [rng.integers(0, vocab, n - prompt_len) for n in lengths])


def _sync(fn) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def sync_rank(rank: int, world: int, cfg: dict, bucket_mb: int, repeats: int):
    import torch

    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.models.hf_config import parse_hf_config
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed
    from gad_megatron.resharding.execute import sync_weights
    from gad_megatron.resharding.transport import InProcessTransport
    from gad_megatron.rollout.hf_engine import HFEngine

    init_distributed(ParallelLayout())
    arch = parse_hf_config(cfg)
    # Values do not matter for bandwidth: skip the (CPU-side) random init of 1.5B weights.
    model = build_gpt(arch, 1, 1, BuildOptions(dtype=torch.bfloat16, init_weights=False,
                                               perf=local_spec_ok())).cuda()
    engine = HFEngine(cfg, dtype=torch.bfloat16, device="cuda")
    dst = [p.detach() for p in engine.model.parameters()]
    src = [torch.empty_like(p) for p in dst]
    nbytes = sum(p.numel() * p.element_size() for p in dst)

    def copy():
        for d, s in zip(dst, src):
            d.copy_(s)

    copy_s = min(_sync(copy) for _ in range(repeats))
    runs = [sync_weights(model, arch, InProcessTransport(engine), bucket_mb << 20)
            for _ in range(repeats + 1)][1:]
    best = min(runs, key=lambda r: r.seconds)
    return nbytes, copy_s, best.bytes, best.seconds


def throughput_rank(rank: int, world: int, cfg: dict, lengths: list[int], budget: int):
    import torch

    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.models.discriminator import build_discriminator, score_micro_batches
    from gad_megatron.models.forward import run_schedule
    from gad_megatron.models.hf_config import parse_hf_config
    from gad_megatron.models.logprobs import micro_batch_logprobs
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed
    from gad_megatron.workers.sequences import micro_batches, per_sequence

    init_distributed(ParallelLayout())
    arch = parse_hf_config(cfg)
    opts = BuildOptions(dtype=torch.bfloat16, init_weights=False, perf=local_spec_ok())
    seqs = random_sequences(lengths, arch.vocab_size, prompt_len=64)
    mbs = [mb.to("cuda") for mb in micro_batches(seqs, budget, pad_id=0, packed=True)]
    out = {}
    policy = build_gpt(arch, 1, 1, opts).cuda().eval()
    with torch.no_grad():
        def logprobs():
            run_schedule(policy, mbs, lambda o, mb: per_sequence(
                micro_batch_logprobs(o, mb, arch.vocab_size), mb))
        logprobs()  # warm-up
        out["logprobs"] = statistics.median(_sync(logprobs) for _ in range(3))
        del policy
        disc = build_discriminator(arch, 1, 1, opts, head_init_std=0.02).cuda().eval()
        score_micro_batches(disc, mbs)
        out["scores"] = statistics.median(_sync(lambda: score_micro_batches(disc, mbs))
                                          for _ in range(3))
    return out


def run_parity(timeout_s: int = 240) -> tuple[bool, str]:
    """`pytest -m gpu` (what `make test-gpu` runs) in a child process: (passed, summary)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"pytest -m gpu ran past {timeout_s} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode == 0, (lines[-1] if lines else proc.stderr[-300:])


def local_spec_ok():
    from gad_megatron.models.perf import PerfConfig

    return PerfConfig(allow_local_spec=True)  # the measurement is about shapes, any spec
