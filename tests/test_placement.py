"""Placement plans, table-tested: every expected slot written out by hand."""

from __future__ import annotations

import pytest

from gad_megatron.cluster.placement import (
    NodeSpec, PlacementError, RoleSpec, Slot, plan_placement)


def slots(*pairs):
    return tuple(Slot(n, d) for n, d in pairs)


def test_one_node_of_8_disaggregated():
    plan = plan_placement([RoleSpec("actor", 4, tp=2), RoleSpec("discriminator", 2, tp=2),
                           RoleSpec("reference", 1), RoleSpec("rollout", 1)],
                          [NodeSpec("n0", 8)])
    assert plan.roles == {
        "actor": slots((0, 0), (0, 1), (0, 2), (0, 3)),
        "discriminator": slots((0, 4), (0, 5)),
        "reference": slots((0, 6)),
        "rollout": slots((0, 7)),
    }
    assert plan.devices_used() == 8 and not plan.colocated


def test_colocated_roles_share_devices():
    plan = plan_placement([RoleSpec("actor", 8, tp=4), RoleSpec("discriminator", 4, tp=2),
                           RoleSpec("reference", 2, tp=2)], [NodeSpec("n0", 8)], colocate=True)
    assert plan.roles["actor"] == slots(*[(0, d) for d in range(8)])
    assert plan.roles["discriminator"] == slots((0, 0), (0, 1), (0, 2), (0, 3))
    assert plan.roles["reference"] == slots((0, 0), (0, 1))
    assert plan.devices_used() == 8


def test_two_nodes_tp8_dp2_keeps_each_tp_group_on_one_node():
    plan = plan_placement([RoleSpec("actor", 16, tp=8)], [NodeSpec("a", 8), NodeSpec("b", 8)])
    assert plan.roles["actor"][:8] == slots(*[(0, d) for d in range(8)])
    assert plan.roles["actor"][8:] == slots(*[(1, d) for d in range(8)])


def test_a_tp_group_never_straddles_nodes():
    # 6 free on node a after the reference, but the actor's TP-4 groups go a:2..5, then b:0..3.
    plan = plan_placement([RoleSpec("reference", 2), RoleSpec("actor", 8, tp=4)],
                          [NodeSpec("a", 8), NodeSpec("b", 8)])
    assert plan.roles["actor"] == slots((0, 2), (0, 3), (0, 4), (0, 5),
                                        (1, 0), (1, 1), (1, 2), (1, 3))


@pytest.mark.parametrize("roles,nodes,message", [
    ([RoleSpec("actor", 8), RoleSpec("discriminator", 2)], [NodeSpec("n0", 8)],
     "discriminator: needs 2 devices in TP groups of 1; the cluster has 0 free device(s)"),
    ([RoleSpec("actor", 16, tp=16)], [NodeSpec("a", 8), NodeSpec("b", 8)],
     "actor: a TP group of 16 does not fit on one node (largest node has 8 devices)"),
    ([RoleSpec("actor", 6, tp=4)], [NodeSpec("a", 8)],
     "actor: world_size=6 must be a positive multiple of tp=4"),
])
def test_refusals_name_the_role_and_counts(roles, nodes, message):
    with pytest.raises(PlacementError) as err:
        plan_placement(roles, nodes)
    assert message in str(err.value)


def test_cpu_slots_work_the_same_way():
    plan = plan_placement([RoleSpec("actor", 2, tp=2), RoleSpec("discriminator", 1),
                           RoleSpec("reference", 1), RoleSpec("rollout", 1)],
                          [NodeSpec("local-cpu", 16)])
    assert [s.device for s in plan.roles["rollout"]] == [4]
