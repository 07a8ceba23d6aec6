"""The weight-group protocol's pure parts: what an engine refuses in a manifest, and why."""

from __future__ import annotations

import pytest
import torch

from gad_megatron.resharding.broadcast import check_manifest, describe, to_dtype
from gad_megatron.resharding.execute import SyncMismatch

HELD = {"a": ((2, 3), "float32"), "b": ((4,), "float32")}


def test_a_manifest_that_fits_is_taken_whole_or_in_part():
    assert check_manifest([["a", [2, 3], "float32"], ["b", [4], "float32"]], HELD, True) is None
    assert check_manifest([["b", [4], "float32"]], HELD, complete=False) is None


@pytest.mark.parametrize("manifest,complete,why", [
    ([["c", [1], "float32"]], False, "'c' is not a weight of the engine's model"),
    ([["a", [3, 2], "float32"]], False, "'a' has shape [3, 2], the engine holds [2, 3]"),
    ([["a", [2, 3], "bfloat16"]], False, "'a' is bfloat16, the engine holds float32"),
    ([["b", [4], "float32"], ["b", [4], "float32"]], False, "'b' is sent twice"),
    ([["b", [4], "float32"]], True,
     "1 weights of the engine's model are not sent and would stay stale, e.g. ['a']"),
])
def test_what_an_engine_refuses_names_the_tensor(manifest, complete, why):
    assert check_manifest(manifest, HELD, complete) == why


def test_manifests_name_dtypes_as_torch_does_without_the_prefix():
    assert describe([("w", torch.zeros(2, 5, dtype=torch.bfloat16))]) == [["w", [2, 5], "bfloat16"]]
    assert to_dtype("float16") is torch.float16
    with pytest.raises(SyncMismatch, match="unknown dtype 'Tensor'"):
        to_dtype("Tensor")  # a torch attribute that is not a dtype


def test_a_weight_group_refuses_a_rank_outside_its_world_and_an_unknown_backend():
    from gad_megatron.resharding.weight_group import WeightGroup

    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        WeightGroup("127.0.0.1", 1, 2, 2)
    with pytest.raises(ValueError, match="backend must be gloo or nccl, got 'mpi'"):
        WeightGroup("127.0.0.1", 1, 2, 0, backend="mpi")
