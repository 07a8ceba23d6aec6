"""`make test-gpu` side of issue 14 (defects 2, 3, 10, 11): the bench-gpu checks as tests,
on a CUDA machine (skipped cleanly elsewhere, by the gpu marker)."""

from __future__ import annotations

import pytest

from gad_megatron.bench_gpu import CHECKS, RUNNERS, parse_args

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("check", CHECKS)
def test_issue14_gpu_check(check):
    # Smaller than the bench's defaults: the same comparison, in test time.
    result = RUNNERS[check](parse_args(["--tokens", "4096", "--vocab", "65536"]))
    if result.status == "skip":
        pytest.skip(result.detail)
    assert result.status == "ok", result.detail
