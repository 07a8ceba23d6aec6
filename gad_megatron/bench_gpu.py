"""`make bench-gpu`: the GPU-only checks, as measurements with a verdict each.

    python -m gad_megatron.bench_gpu [--only te,sglang,logprobs,varlen,mfu,sync,throughput,parity]
                                     [--tokens 8192] [--vocab 152064] [--model-dir DIR]
                                     [--rows 4] [--seq 2048] [--iters 5] [--bucket-mb 512]

- te (issue 14, defect 10): on CUDA, building a GPT without Transformer Engine is refused
  unless perf.allow_local_spec; with TE the TE spec is used.
- sglang (defects 2, 3): a tiny model in SGLang: weights synced, then sleep and wake, then
  greedy output unchanged (the CPU weight backup works); two seeded samplings agree.
- logprobs (defect 11): peak CUDA memory of forward+backward of the token log-probs over
  [tokens, vocab] bf16 logits, chunked (models/logprobs.py) vs the direct form.
- varlen (defect 11): peak CUDA memory of one training forward+backward of a GPT over
  variable-length micro-batches, padded to the batch's rows x longest (the old PP>1
  layout) vs each at its own shape (what variable_seq_lengths lets PP>1 do).
- mfu (issue 11): model FLOPs utilisation of one actor update (forward, backward and the
  Megatron optimizer step, through models/optim.train_step) on Qwen2.5-1.5B's shape in
  bf16, over one packed (THD) micro-batch of rows x seq tokens in sequences of mixed
  lengths; FLOPs from gad_megatron/flops.py, where the formula is written out.
- sync, throughput, parity (issue 11): bench_gpu_paths.py.
Every check says `skip: <why>` and the command exits 0 when its needs (CUDA, the package)
are missing, so it runs anywhere; a check that fails says `FAIL` and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from gad_megatron.bench_gpu_paths import local_spec_ok

CHECKS = ("te", "sglang", "logprobs", "varlen", "mfu", "sync", "throughput", "parity")

# Qwen2.5-1.5B's shape (its config.json), random weights: the MFU check's model.
QWEN25_1P5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "eos_token_id": 151643,
}


@dataclass
class Result:
    check: str
    status: str  # 'ok', 'skip' or 'FAIL'
    detail: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU checks of issue 14 (skip without CUDA)")
    parser.add_argument("--only", default=",".join(CHECKS),
                        help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--tokens", type=int, default=8192, help="logprobs: positions")
    parser.add_argument("--vocab", type=int, default=152064, help="logprobs: vocabulary")
    parser.add_argument("--rows", type=int, default=4, help="mfu: sequences per update")
    parser.add_argument("--seq", type=int, default=2048, help="mfu: tokens per sequence")
    parser.add_argument("--iters", type=int, default=5, help="mfu: timed updates (after 2)")
    parser.add_argument("--bucket-mb", type=int, default=512, help="sync: bucket size, MiB")
    parser.add_argument("--model-dir", default="", help="sglang: an HF model dir (default: "
                        "a tiny random Qwen3 written to a temporary directory)")
    args = parser.parse_args(argv)
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(args.only) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    if args.tokens < 1 or args.vocab < 2:
        parser.error("--tokens must be >= 1 and --vocab >= 2")
    if min(args.rows, args.seq, args.iters, args.bucket_mb) < 1:
        parser.error("--rows, --seq, --iters and --bucket-mb must be >= 1")
    return args


def _needs_cuda(check: str) -> Result | None:
    import torch

    return None if torch.cuda.is_available() else Result(check, "skip", "no CUDA device")


def check_te(args) -> Result:
    import importlib.util

    from gad_megatron.models.builder import BuildOptions, resolve_te
    from gad_megatron.models.perf import LocalSpecRefused, PerfConfig

    if importlib.util.find_spec("transformer_engine") is not None:
        return (Result("te", "ok", "transformer_engine present: TE layer spec")
                if resolve_te(BuildOptions()) else Result("te", "FAIL", "TE present, unused"))
    try:
        resolve_te(BuildOptions())
    except LocalSpecRefused:
        allowed = resolve_te(BuildOptions(perf=PerfConfig(allow_local_spec=True)))
        return Result("te", "ok" if allowed is False else "FAIL",
                      "no TE: refused by default, local spec only when allowed")
    return Result("te", "FAIL", "CUDA without TE was not refused")


def check_sglang(args) -> Result:
    import importlib.util
    import tempfile
    from pathlib import Path

    if importlib.util.find_spec("sglang") is None:
        return Result("sglang", "skip", "sglang is not installed (make setup-gpu ENGINE=sglang)")
    import torch

    from gad_megatron.rollout import make_engine
    from gad_megatron.rollout.hf_engine import HFEngine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or _tiny_model(Path(tmp) / "m")
        engine = make_engine("sglang", model_dir, eos_id=99, pad_id=0, dtype="bfloat16",
                             gpu_memory_utilization=0.3)
        g = torch.Generator().manual_seed(0)
        new = [(n, p.detach().cpu() + 0.05 * torch.randn(p.shape, generator=g))
               for n, p in HFEngine.from_pretrained(model_dir, eos_id=99).state_dict().items()]
        engine.update_weights(new)
        prompts, kw = [[1, 2, 3], [4, 5]], dict(top_p=1.0, max_new_tokens=8)
        before = engine.generate(prompts, n=1, temperature=0.0, seed=0, **kw).responses
        engine.sleep()
        engine.wake()
        after = engine.generate(prompts, n=1, temperature=0.0, seed=0, **kw).responses
        seeded = [engine.generate(prompts, n=4, temperature=1.0, seed=7, **kw).responses
                  for _ in range(2)]
    problems = [p for p, bad in (("weights changed by sleep/wake", before != after),
                                 ("seeded samplings differ", seeded[0] != seeded[1])) if bad]
    return Result("sglang", "FAIL" if problems else "ok",
                  "; ".join(problems) or "sync, sleep, wake: same greedy output; seeds agree")


def _tiny_model(path) -> str:
    from tests.tiny_models import make_hf_model  # the test suite's tiny random models

    return str(make_hf_model("qwen3", path))


def _peak(fn) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check_logprobs(args) -> Result:
    import torch

    from gad_megatron.models.logprobs import vocab_parallel_logprobs

    logits = torch.randn(1, args.tokens, args.vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, args.vocab, (1, args.tokens), device="cuda")

    def chunked():
        x = logits.clone().requires_grad_(True)
        lp, ent = vocab_parallel_logprobs(x, targets, args.vocab, 0.8, with_entropy=True)
        (lp.sum() + ent.sum()).backward()

    def direct():
        x = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(x.float() / 0.8, dim=-1)
        lp = logp.gather(-1, targets.unsqueeze(-1))
        (lp.sum() - (logp.exp() * logp).sum()).backward()

    got, ref = _peak(chunked), _peak(direct)
    gib = 1 << 30
    status = "ok" if got < ref else "FAIL"
    return Result("logprobs", status, f"peak {got / gib:.2f} GiB chunked vs {ref / gib:.2f} GiB "
                                      f"direct ({got / ref:.2f}x) at {args.tokens}x{args.vocab}")


def check_varlen(args) -> Result:
    from gad_megatron.parallel.launch import spawn_ranks

    padded, own = spawn_ranks(_varlen_rank, 1, timeout_s=600, backend="nccl")[0]
    gib = 1 << 30
    return Result("varlen", "ok" if own < padded else "FAIL",
                  f"peak {own / gib:.2f} GiB at own shapes vs {padded / gib:.2f} GiB padded")


def _varlen_rank(rank: int, world: int):
    import torch

    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.models.forward import MicroBatch, run_schedule
    from gad_megatron.models.hf_config import parse_hf_config
    from gad_megatron.bench import SYNC_MODEL
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())  # one rank: the padding cost is the same per stage
    arch = parse_hf_config({**SYNC_MODEL, "max_position_embeddings": 4096})
    model = build_gpt(arch, 1, 1, BuildOptions(dtype=torch.bfloat16,
                                               perf=local_spec_ok())).cuda()
    lengths = [4096, 256, 256, 512, 128, 128, 1024, 64]  # one long answer, many short

    def batches(pad: bool):
        width = max(lengths)
        return [MicroBatch(torch.ones(1, width if pad else n, dtype=torch.long, device="cuda"),
                           torch.ones(1, width if pad else n, dtype=torch.bool,
                                      device="cuda"), {}) for n in lengths]

    def run(pad: bool):
        model.zero_grad(set_to_none=True)
        run_schedule(model, batches(pad), lambda o, mb: (o.float().mean(), 0, {}),
                     forward_only=False)

    return _peak(lambda: run(True)), _peak(lambda: run(False))


def check_mfu(args) -> Result:
    import torch

    from gad_megatron.flops import peak_flops
    from gad_megatron.parallel.launch import spawn_ranks

    flops, seconds, spec = spawn_ranks(
        _update_rank, 1, args=(QWEN25_1P5B, args.rows, args.seq, args.iters),
        timeout_s=600, backend="nccl")[0]
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    achieved = flops / seconds
    mfu = f"MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "peak unknown"
    return Result("mfu", "ok", f"{achieved / 1e12:.1f} TFLOP/s, {mfu} ({name}); Qwen2.5-1.5B "
                               f"shape, bf16, {args.rows}x{args.seq} tokens per update, "
                               f"{seconds:.3f} s per update, {spec} spec")


def measure_update(cfg: dict, rows: int, seq: int, iters: int) -> tuple[int, float, str]:
    """(model FLOPs, seconds) of one actor update on this rank's device, averaged over
    `iters` timed updates after two untimed ones; and which layer spec ran. The update is
    one packed micro-batch of rows x seq real tokens in sequences of mixed lengths
    (`packed_lengths`), so no padding token is counted and attention FLOPs are each
    sequence's own. Parallel state must be initialised."""
    import time

    import torch

    from gad_megatron.bench_gpu_paths import packed_lengths, random_sequences
    from gad_megatron.flops import train_flops
    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.models.hf_config import parse_hf_config
    from gad_megatron.models.logprobs import micro_batch_logprobs
    from gad_megatron.models.optim import OptimConfig, train_step, wrap_for_training
    from gad_megatron.parallel.dist import device
    from gad_megatron.workers.sequences import to_packed_micro_batch

    dev = device()
    arch = parse_hf_config(cfg)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_gpt(arch, 1, 1, BuildOptions(dtype=dtype, perf=local_spec_ok())).to(dev)
    te = any(type(m).__module__.startswith("transformer_engine") for m in model.modules())
    spec = "TE" if te else "local"
    ddp, optimizer, scheduler = wrap_for_training(model, OptimConfig(lr=1e-6))
    lengths = packed_lengths(rows * seq, seq)
    seqs = random_sequences(lengths, arch.vocab_size, prompt_len=1)
    mb = to_packed_micro_batch(seqs, list(range(len(lengths))), pad_id=0).to(dev)

    def loss_fn(output, batch):
        lp = micro_batch_logprobs(output, batch, arch.vocab_size)
        tokens = batch.valid.sum()
        loss = -(lp * batch.valid).sum() / tokens
        return loss, tokens, {"loss": loss.detach()}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        train_step(ddp, optimizer, scheduler, [mb], loss_fn)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        train_step(ddp, optimizer, scheduler, [mb], loss_fn)
    sync()
    return train_flops(arch, lengths), (time.perf_counter() - start) / iters, spec


def _update_rank(rank: int, world: int, cfg: dict, rows: int, seq: int, iters: int):
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed

    init_distributed(ParallelLayout())
    return measure_update(cfg, rows, seq, iters)


def check_sync(args) -> Result:
    from gad_megatron.bench_gpu_paths import sync_rank
    from gad_megatron.parallel.launch import spawn_ranks

    nbytes, copy_s, sent, sync_s = spawn_ranks(
        sync_rank, 1, args=(QWEN25_1P5B, args.bucket_mb, 3), timeout_s=600, backend="nccl")[0]
    copy_gbs, sync_gbs = nbytes / copy_s / 1e9, sent / sync_s / 1e9
    return Result("sync", "ok" if sent == nbytes else "FAIL",
                  f"{sync_gbs:.1f} GB/s weight sync ({sent / 1e9:.2f} GB in {sync_s:.3f} s, "
                  f"{args.bucket_mb} MiB buckets) vs {copy_gbs:.1f} GB/s device copy of the "
                  f"same bytes: {copy_s / sync_s:.2f}x the copy's speed; Qwen2.5-1.5B bf16")


def check_throughput(args) -> Result:
    from gad_megatron.bench_gpu_paths import packed_lengths, throughput_rank
    from gad_megatron.parallel.launch import spawn_ranks

    lengths = packed_lengths(16 * args.seq, args.seq, seed=1)
    secs = spawn_ranks(throughput_rank, 1, args=(QWEN25_1P5B, lengths, 4 * args.seq),
                       timeout_s=600, backend="nccl")[0]
    tokens = sum(lengths)
    return Result("throughput", "ok",
                  f"log-probs {tokens / secs['logprobs']:.0f} tokens/s, D scores "
                  f"{tokens / secs['scores']:.0f} tokens/s (forward only, packed, "
                  f"{len(lengths)} sequences, {tokens} tokens); Qwen2.5-1.5B bf16")


def check_parity(args) -> Result:
    from gad_megatron.bench_gpu_paths import run_parity

    passed, summary = run_parity()
    return Result("parity", "ok" if passed else "FAIL", f"pytest -m gpu: {summary}")


RUNNERS = {"te": check_te, "sglang": check_sglang, "logprobs": check_logprobs,
           "varlen": check_varlen, "mfu": check_mfu, "sync": check_sync,
           "throughput": check_throughput, "parity": check_parity}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    for check in args.only:
        result = _needs_cuda(check) or RUNNERS[check](args)
        results.append(result)
        print(f"{result.check:<9} {result.status:<5} {result.detail}", flush=True)
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
