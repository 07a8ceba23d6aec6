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
