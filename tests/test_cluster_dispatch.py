"""Batch dispatch over DP replicas and Megatron's rank order, checked against Megatron itself."""

from __future__ import annotations

import pytest

from gad_megatron.cluster.dispatch import (
    all_coords, collect_from, rank_coords, scatter_to_ranks, split_for_dp)
from tests.dist_utils import run_parallel


@pytest.mark.parametrize("n,dp,sizes", [
    (8, 2, [4, 4]),
    (7, 3, [2, 3, 2]),  # cuts at 2.33 -> 2 and 4.67 -> 5
    (5, 1, [5]),
    (2, 4, [1, 1, 0, 0]),  # fewer items than replicas: trailing shards empty
    (0, 2, [0, 0]),
])
def test_split_for_dp_contiguous_and_balanced(n, dp, sizes):
    shards = split_for_dp(list(range(n)), dp)
    assert [len(s) for s in shards] == sizes
    assert [x for s in shards for x in s] == list(range(n))


def test_split_for_dp_keeps_each_prompts_group_together():
    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4
    assert [len(s) for s in split_for_dp(groups, 2, groups)] == [8, 8]
    # three groups of 4 over 2 replicas: the cut at 6 moves to the boundary at 4 (tie -> earlier)
    three = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert split_for_dp(three, 2, three) == [["a"] * 4, ["b"] * 4 + ["c"] * 4]
    # uneven groups: every replica still gets a whole group
    uneven = ["a"] * 5 + ["b"] + ["c"]
    assert split_for_dp(uneven, 3, uneven) == [["a"] * 5, ["b"], ["c"]]
    with pytest.raises(ValueError, match="group 'a' is not contiguous"):
        split_for_dp([1, 2, 3], 2, ["a", "b", "a"])


def test_rank_coords_by_hand():
    # tp=2, pp=2, dp=2: TP fastest, then DP, then PP.
    assert all_coords(tp=2, pp=2, dp=2) == [
        (0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1),
        (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
    with pytest.raises(ValueError, match="outside a world of tp\\*pp\\*dp = 8"):
        rank_coords(8, 2, 2, 2)


@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 2), (4, 2, 2), (1, 4, 2), (2, 3, 1), (8, 1, 2)])
def test_rank_coords_match_megatrons_rank_generator(tp, pp, dp):
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    coords = all_coords(tp, pp, dp)
    for token, axis in (("tp", 2), ("pp", 1), ("dp", 0)):
        for group in gen.get_ranks(token):
            # each group: one fixed value of the other two axes, this axis counting up
            assert [coords[r][axis] for r in group] == list(range(len(group)))
            others = {tuple(c for i, c in enumerate(coords[r]) if i != axis) for r in group}
            assert len(others) == 1


def _megatron_coords(rank: int, layouts: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """This rank's (dp, pp, tp) under each (tp, pp) layout, as Megatron's parallel state has
    it. Re-initialising in the same processes costs far less than spawning ranks again."""
    from megatron.core import parallel_state as ps

    out = []
    for tp, pp in layouts:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
        out.append((ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                    ps.get_tensor_model_parallel_rank()))
    return out


def test_rank_coords_match_real_megatron_parallel_state_on_4_gloo_ranks():
    layouts = [(2, 2), (1, 2), (2, 1)]  # (tp, pp) on 4 ranks: dp = 1, 2, 2
    per_rank = run_parallel(_megatron_coords, tp=2, pp=2, args=(layouts,), timeout_s=120)
    for i, (tp, pp) in enumerate(layouts):
        assert [coords[i] for coords in per_rank] == all_coords(tp, pp, 4 // (tp * pp))


def test_collect_from_reads_last_stage_tp0_in_dp_order():
    coords = all_coords(tp=2, pp=2, dp=2)
    results = [f"r{r}" for r in range(8)]
    assert collect_from(results, coords) == ["r4", "r6"]
    assert collect_from(["x", "y"], all_coords(1, 1, 2)) == ["x", "y"]


def test_scatter_gives_every_rank_its_replicas_shard():
    assert scatter_to_ranks(["s0", "s1"], tp=2, pp=2, dp=2) == [
        "s0", "s0", "s1", "s1", "s0", "s0", "s1", "s1"]
    with pytest.raises(ValueError, match="3 shards for dp=2"):
        scatter_to_ranks([1, 2, 3], 1, 1, 2)
