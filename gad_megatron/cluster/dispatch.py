"""How a batch goes to a role's ranks and how results come back. Pure: no Ray, no torch.

Megatron's default rank order (`initialize_model_parallel(order="tp-cp-ep-dp-pp")`; cp = ep
= 1 here) makes TP the fastest-varying coordinate, then DP, then PP:

    rank = tp_rank + tp * dp_rank + tp * dp * pp_rank

Every rank of one DP replica (all its TP and PP ranks) must see the same shard; the replica's
result is read on its output rank: the last pipeline stage (which computes the loss and the
logits) at TP rank 0 (TP ranks hold identical copies of it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any


def rank_coords(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """(dp_rank, pp_rank, tp_rank) of a global rank in Megatron's default order."""
    if not 0 <= rank < tp * pp * dp:
        raise ValueError(f"rank {rank} is outside a world of tp*pp*dp = {tp * pp * dp}")
    return (rank // tp) % dp, rank // (tp * dp), rank % tp


def all_coords(tp: int, pp: int, dp: int) -> list[tuple[int, int, int]]:
    """`rank_coords` of every rank, in rank order."""
    return [rank_coords(r, tp, pp, dp) for r in range(tp * pp * dp)]


def _units(n: int, group_ids: Sequence[Hashable] | None) -> list[tuple[int, int]]:
    """[start, end) of each unit that must stay on one replica: one item, or one group."""
    if group_ids is None:
        return [(i, i + 1) for i in range(n)]
    if len(group_ids) != n:
        raise ValueError(f"{len(group_ids)} group ids for {n} items")
    units, seen = [], set()
    for i in range(n):
        if i == 0 or group_ids[i] != group_ids[i - 1]:
            if group_ids[i] in seen:
                # A group split in two runs cannot be both contiguous and kept together.
                raise ValueError(f"group {group_ids[i]!r} is not contiguous in the batch")
            seen.add(group_ids[i])
            units.append([i, i + 1])
        else:
            units[-1][1] = i + 1
    return [tuple(u) for u in units]


def split_for_dp(items: Sequence[Any], dp: int,
                 group_ids: Sequence[Hashable] | None = None) -> list[list]:
    """`dp` contiguous shards of `items`, as equal in size as whole groups allow.

    With `group_ids` (one per item; a prompt's samples share one and sit together) a group
    is never split. Each cut goes to the unit boundary closest to its ideal position (ties to
    the earlier one) while every shard keeps at least one unit, so the result is
    deterministic. Fewer units than `dp` leaves the last shards empty: the caller decides
    whether a replica may run on nothing.
    """
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    items = list(items)
    units = _units(len(items), group_ids)
    bounds = [0] + [end for _, end in units]  # candidate cut positions, increasing
    n_units, cuts, prev = len(units), [0], 0
    for d in range(1, dp):
        if n_units < dp:  # one unit per shard, the rest empty
            prev = min(d, n_units)
        else:  # leave at least one unit for each shard still to come
            ideal = len(items) * d / dp
            prev = min(range(prev + 1, n_units - (dp - d) + 1),
                       key=lambda k: (abs(bounds[k] - ideal), k))
        cuts.append(bounds[prev])
    cuts.append(len(items))
    return [items[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def collect_from(results: Sequence[Any], coords: Sequence[tuple[int, int, int]]) -> list:
    """Per DP replica (in DP order), the result of its output rank: last PP stage, TP 0."""
    if len(results) != len(coords):
        raise ValueError(f"{len(results)} results for {len(coords)} ranks")
    last_stage = max(pp for _, pp, _ in coords)
    picked = {dp: res for res, (dp, pp, tp) in zip(results, coords)
              if pp == last_stage and tp == 0}
    return [picked[d] for d in sorted(picked)]


def scatter_to_ranks(per_dp: Sequence[Any], tp: int, pp: int, dp: int) -> list:
    """Rank r's share: `per_dp[dp_rank(r)]`, for every rank in rank order.

    Wrap each in a tuple for `RayWorkerGroup.call_per_rank`, e.g.
    `[(shard,) for shard in scatter_to_ranks(shards, tp, pp, dp)]`.
    """
    if len(per_dp) != dp:
        raise ValueError(f"{len(per_dp)} shards for dp={dp}")
    return [per_dp[d] for d, _, _ in all_coords(tp, pp, dp)]
