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


# ---- Ray reservations (issue 14, defects 4 and 5) --------------------------------------

from gad_megatron.cluster.placement import COLOCATED, Bundle, Seat  # noqa: E402


def test_colocated_reservation_is_whole_gpus_and_rank_r_of_every_role_sits_on_gpu_r():
    # Before: each role reserved fractional bundles of its own, and Ray's best fit could put
    # actor ranks 0 and 1 on the same GPU (NCCL refuses duplicate devices).
    plan = plan_placement(roles(RoleSpec("actor", 4, tp=2), RoleSpec("discriminator", 4, tp=2),
                                RoleSpec("reference", 2), RoleSpec("rollout", 2, tp=2,
                                                                   engine=True)),
                          [gpu_node("n0", gpus=4)], colocate=True, use_gpus=True)
    assert plan.bundles(COLOCATED) == tuple(Bundle("n0", 1, 1.0) for _ in range(4))
    q = 0.25  # four roles share each GPU
    for name, ranks in (("actor", 4), ("discriminator", 4), ("reference", 2)):
        place = plan.role(name)
        assert place.reservation == COLOCATED and place.bundles == plan.bundles(COLOCATED)
        assert place.seats == tuple(Seat(r, q, q, (r,)) for r in range(ranks))
    # the engine: one actor on the bundle of its rank 0, driving the GPUs of bundles 0 and 1
    assert plan.role("rollout").seats == (Seat(0, q, q, (0, 1)),)


def test_disaggregated_engine_reserves_its_tp_gpus_in_one_bundle():
    # Before: the engine actor asked for num_gpus=1 whatever rollout.tp was, and vLLM refused
    # "World size (2) is larger than the number of available GPUs (1)".
    plan = plan_placement(roles(RoleSpec("actor", 4, tp=4), RoleSpec("rollout", 2, tp=2,
                                                                     engine=True)),
                          [gpu_node("a", gpus=4), gpu_node("b", gpus=4)], use_gpus=True)
    rollout = plan.role("rollout")
    assert plan.roles["rollout"] == slots((1, 0), (1, 1))
    assert rollout.bundles == (Bundle("b", 2, 1.0),) and rollout.seats == (Seat(0, 2.0, 1.0, (0,)),)
    actor = plan.role("actor")
    assert actor.bundles == tuple(Bundle("a", 1, 1.0) for _ in range(4))
    assert actor.seats == tuple(Seat(r, 1.0, 1.0, (r,)) for r in range(4))


def test_cpu_mode_reservations_hold_no_gpus():
    plan = plan_placement(roles(RoleSpec("actor", 2), RoleSpec("rollout", 1, engine=True)),
                          [NodeSpec("127.0.0.1", cpus=4)], colocate=True, use_gpus=False)
    assert plan.bundles(COLOCATED) == (Bundle("127.0.0.1", 0, 1.0), Bundle("127.0.0.1", 0, 1.0))
    assert plan.role("rollout").seats == (Seat(0, 0.0, 0.5, (0,)),)


def test_the_run_places_its_engine_through_the_plan_with_its_tp():
    from types import SimpleNamespace

    from gad_megatron.config import GADConfig
    from gad_megatron.config.schema import RolloutConfig, RunConfig
    from gad_megatron.trainer.ray_backend import role_specs

    cfg = GADConfig(run=RunConfig(use_gpus=True), rollout=RolloutConfig(tp=2))
    specs = role_specs(cfg, SimpleNamespace(discriminator=None, reference=None))
    assert specs[-1] == RoleSpec("rollout", 2, 2, engine=True)
    plan = plan_placement(specs, [gpu_node("n0", gpus=3)], use_gpus=True)
    assert plan.role("rollout").bundles == (Bundle("n0", 2, 1.0),)
