"""`make bench-gpu`'s CPU side: argument parsing, and a clean skip of every check without
CUDA (issue 14: bench-gpu covers defects 2, 3, 10 and 11 on a lent device)."""

from __future__ import annotations

import pytest
import torch

from gad_megatron.bench_gpu import CHECKS, main, parse_args


def test_defaults_and_subsets():
    args = parse_args([])
    assert args.only == list(CHECKS) and args.tokens == 8192 and args.vocab == 152064
    assert parse_args(["--only", "te, logprobs", "--tokens", "64"]).only == ["te", "logprobs"]


@pytest.mark.parametrize("argv,message", [
    (["--only", "te,nccl"], "unknown check(s) ['nccl']"),
    (["--tokens", "0"], "--tokens must be >= 1"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_every_check_skips_and_the_run_passes(capsys):
    assert main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [[c, "skip"] for c in CHECKS]
    assert all("no CUDA device" in ln for ln in lines)


# A decoder small enough to count by hand: h=4, 2 heads of d=2 (q width 4), 1 KV head
# (k, v width 2 each), MLP width f=8, vocabulary 10, one layer.
TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 10,
        "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_act": "silu",
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "torch_dtype": "float32"}


def test_flop_formula_against_a_hand_count():
    from gad_megatron.flops import forward_flops_per_sequence, peak_flops, train_flops
    from gad_megatron.models.hf_config import parse_hf_config

    arch = parse_hf_config(TINY)
    # s = 3: q,k,v 2*3*4*(4+2+2) = 192; attention 2*2*4 * (3*4/2 = 6 pairs) = 96;
    # output 2*3*4*4 = 96; MLP 2*3*3*4*8 = 576; layer 960; output layer 2*3*4*10 = 240.
    assert forward_flops_per_sequence(arch, 3) == 1200
    # s = 1: 64 + 16 (1 pair) + 32 + 192 + 80 = 384; training is 3x the forward.
    assert forward_flops_per_sequence(arch, 1) == 384
    assert train_flops(arch, [3, 1]) == 3 * (1200 + 384)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("Tesla T4") is None


def test_the_mfu_measurement_runs_the_real_update_on_cpu():
    """The MFU check's measurement, on CPU at a tiny shape: the real Megatron update runs and
    the FLOPs it reports are the formula's (the GPU run only changes the shape and dtype)."""
    from gad_megatron.bench_gpu import _update_rank
    from gad_megatron.flops import train_flops
    from gad_megatron.models.hf_config import parse_hf_config
    from gad_megatron.parallel.launch import spawn_ranks

    cfg = {**TINY, "hidden_size": 64, "num_attention_heads": 2, "head_dim": 32,
           "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 256}
    flops, seconds, spec = spawn_ranks(_update_rank, 1, args=(cfg, 2, 16, 1), timeout_s=300)[0]
    from gad_megatron.bench_gpu_paths import packed_lengths

    # One packed micro-batch of 2 x 16 tokens in mixed lengths; attention FLOPs per sequence.
    assert flops == train_flops(parse_hf_config(cfg), packed_lengths(32, 16)) and seconds > 0
    assert spec == "local"


def test_mfu_arguments():
    args = parse_args(["--only", "mfu", "--rows", "2", "--seq", "512"])
    assert args.only == ["mfu"] and (args.rows, args.seq, args.iters) == (2, 512, 5)
    with pytest.raises(SystemExit):
        parse_args(["--seq", "0"])


def test_packed_lengths_sum_to_the_budget_in_mixed_lengths():
    from gad_megatron.bench_gpu_paths import packed_lengths

    for total, seq in ((8192, 2048), (32, 16), (100, 7)):
        lengths = packed_lengths(total, seq)
        assert sum(lengths) == total and min(lengths) >= 1
        assert len(set(lengths)) > 1 and max(lengths) < 2 * seq
    assert packed_lengths(8192, 2048) == packed_lengths(8192, 2048)  # seeded


def test_sync_and_throughput_arguments():
    args = parse_args(["--only", "sync,throughput,parity", "--bucket-mb", "64"])
    assert args.only == ["sync", "throughput", "parity"] and args.bucket_mb == 64
    with pytest.raises(SystemExit):
        parse_args(["--bucket-mb", "0"])
