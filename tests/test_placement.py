"""Placement plans, table-tested: every expected slot written out by hand."""

from __future__ import annotations

import pytest

from gad_megatron.cluster.placement import (
    NodeSpec, PlacementError, RoleSpec, Slot, plan_placement)


def slots(*pairs):
    return tuple(Slot(n, d) for n, d in pairs)


def gpu_node(name, gpus=8, cpus=64):
    return NodeSpec(name, gpus=gpus, cpus=cpus)


def roles(*specs):
    return {s.name: s for s in specs}


def test_one_node_of_8_disaggregated():
    plan = plan_placement(roles(RoleSpec("actor", 4, tp=2), RoleSpec("discriminator", 2, tp=2),
                                RoleSpec("reference", 1), RoleSpec("rollout", 1)),
                          [gpu_node("10.0.0.1")], colocate=False, use_gpus=True)
    assert plan.roles == {
        "actor": slots((0, 0), (0, 1), (0, 2), (0, 3)),
        "discriminator": slots((0, 4), (0, 5)),
        "reference": slots((0, 6)),
        "rollout": slots((0, 7)),
    }
    assert plan.devices_used() == 8 and not plan.colocated
    disc = plan.role("discriminator")
    assert disc.node_names == ("10.0.0.1", "10.0.0.1") and disc.share == 1
    assert [disc.device_of(r) for r in range(2)] == [4, 5] and disc.single_node()


def test_colocated_on_8_every_role_shares_the_same_devices():
    plan = plan_placement(roles(RoleSpec("actor", 8, tp=4), RoleSpec("discriminator", 4, tp=2),
                                RoleSpec("reference", 2, tp=2), RoleSpec("rollout", 4, tp=4)),
                          [gpu_node("n0")], colocate=True, use_gpus=True)
    assert plan.roles["actor"] == slots(*[(0, d) for d in range(8)])
    assert plan.roles["discriminator"] == slots((0, 0), (0, 1), (0, 2), (0, 3))
    assert plan.roles["reference"] == slots((0, 0), (0, 1))
    assert plan.roles["rollout"] == slots((0, 0), (0, 1), (0, 2), (0, 3))
    assert plan.devices_used() == 8 and plan.role("actor").share == 4


def test_two_nodes_of_8_actor_tp8_dp2_one_tp_group_per_node():
    plan = plan_placement(roles(RoleSpec("actor", 16, tp=8)), [gpu_node("a"), gpu_node("b")],
                          colocate=False, use_gpus=True)
    assert plan.roles["actor"][:8] == slots(*[(0, d) for d in range(8)])
    assert plan.roles["actor"][8:] == slots(*[(1, d) for d in range(8)])
    actor = plan.role("actor")
    assert actor.node_of(7) == "a" and actor.node_of(8) == "b" and not actor.single_node()


def test_a_tp_group_never_straddles_nodes():
    # 6 free on node a after the reference, but the actor's TP-4 groups go a:2..5, then b:0..3.
    plan = plan_placement([RoleSpec("reference", 2), RoleSpec("actor", 8, tp=4)],
                          [gpu_node("a"), gpu_node("b")], use_gpus=True)
    assert plan.roles["actor"] == slots((0, 2), (0, 3), (0, 4), (0, 5),
                                        (1, 0), (1, 1), (1, 2), (1, 3))


@pytest.mark.parametrize("specs,nodes,message", [
    # too few GPUs: the actor takes all 8, nothing is left for the discriminator
    ([RoleSpec("actor", 8), RoleSpec("discriminator", 2)], [gpu_node("n0")],
     "discriminator: needs 2 devices (GPUs) in TP groups of 1; the cluster has 0 of its 8"),
    # a TP group larger than a node
    ([RoleSpec("actor", 16, tp=16)], [gpu_node("a"), gpu_node("b")],
     "actor: a TP group of 16 does not fit on one node (largest node has 8 GPUs)"),
    ([RoleSpec("actor", 6, tp=4)], [gpu_node("a")],
     "actor: world_size=6 must be a positive multiple of tp=4"),
    # 4 GPUs left in all, but 2 + 2 on two nodes cannot hold one TP-4 group
    ([RoleSpec("reference", 6), RoleSpec("rollout", 6, tp=6), RoleSpec("actor", 4, tp=4)],
     [gpu_node("a"), gpu_node("b")],
     "actor: needs 4 devices (GPUs) in TP groups of 4; the cluster has 4 of its 16 left for "
     "it (no node has 4 free together)"),
    # one CPU per GPU rank
    ([RoleSpec("actor", 8)], [gpu_node("a", cpus=4)], "node a: 8 ranks need 8 CPUs"),
])
def test_refusals_name_the_role_and_counts(specs, nodes, message):
    with pytest.raises(PlacementError) as err:
        plan_placement(specs, nodes, colocate=False, use_gpus=True)
    assert message in str(err.value)


def test_colocated_refuses_tp_sizes_that_do_not_nest():
    with pytest.raises(PlacementError, match="actor tp=4 world_size=8, rollout tp=3"):
        plan_placement([RoleSpec("actor", 8, tp=4), RoleSpec("rollout", 3, tp=3)],
                       [gpu_node("n0")], colocate=True, use_gpus=True)


def test_cpu_only_mode_places_on_cpu_slots():
    nodes = [NodeSpec("127.0.0.1", gpus=0, cpus=16)]
    plan = plan_placement(roles(RoleSpec("actor", 2, tp=2), RoleSpec("discriminator", 1),
                                RoleSpec("reference", 1), RoleSpec("rollout", 1)),
                          nodes, colocate=False, use_gpus=False)
    assert plan.roles["rollout"] == slots((0, 4)) and not plan.use_gpus
    with pytest.raises(PlacementError, match=r"actor: needs 32 devices \(CPU slots\)"):
        plan_placement([RoleSpec("actor", 32)], nodes, use_gpus=False)
    # a GPU node's CPUs are slots too when GPUs are not used
    assert plan_placement([RoleSpec("actor", 4)], [gpu_node("g", gpus=2, cpus=4)],
                          use_gpus=False).roles["actor"] == slots(*[(0, d) for d in range(4)])


def test_use_gpus_none_picks_gpus_when_the_cluster_has_them():
    assert plan_placement([RoleSpec("actor", 2)], [gpu_node("g")]).use_gpus
    assert not plan_placement([RoleSpec("actor", 2)], [NodeSpec("c", cpus=4)]).use_gpus
