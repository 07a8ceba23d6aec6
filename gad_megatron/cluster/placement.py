"""Where every rank of every role runs: a pure function of the layout and the cluster.

No Ray here: the plan is computed (and table-tested) first, then the Ray backend turns each
role's slice into placement-group bundles.

Rules:
- disaggregated: each role gets devices of its own, roles in order, packed node by node;
- colocated: every role uses the same devices (the largest role's), time-sharing them;
- a tensor-parallel group never spans nodes (its all-reduces need the intra-node fabric);
- too few devices, or a TP group larger than a node, is refused naming the role and counts.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """The requested layout does not fit the cluster."""


@dataclass(frozen=True)
class RoleSpec:
    """One role's demand."""

    name: str
    world_size: int
    """Ranks (tp * pp * dp for Megatron roles; the engine's tp for a rollout engine)."""
    tp: int = 1
    """Ranks that must share a node (consecutive ranks form a TP group)."""


@dataclass(frozen=True)
class NodeSpec:
    """One node of the cluster."""

    name: str
    devices: int
    """GPUs (or CPU slots in CPU mode) usable by workers."""


@dataclass(frozen=True)
class Slot:
    """One rank's place: node index and device index on that node."""

    node: int
    device: int


@dataclass(frozen=True)
class PlacementPlan:
    roles: dict[str, tuple[Slot, ...]]
    """Per role, the slot of each rank (rank order)."""
    colocated: bool

    def devices_used(self) -> int:
        return len({s for slots in self.roles.values() for s in slots})

    def nodes_of(self, role: str) -> list[int]:
        return sorted({s.node for s in self.roles[role]})


def _validate(roles: list[RoleSpec], nodes: list[NodeSpec]) -> None:
    if not nodes or any(n.devices < 1 for n in nodes):
        raise PlacementError("the cluster needs at least one node with at least one device")
    biggest = max(n.devices for n in nodes)
    for r in roles:
        if r.world_size < 1 or r.tp < 1 or r.world_size % r.tp:
            raise PlacementError(f"{r.name}: world_size={r.world_size} must be a positive "
                                 f"multiple of tp={r.tp}")
        if r.tp > biggest:
            raise PlacementError(f"{r.name}: a TP group of {r.tp} does not fit on one node "
                                 f"(largest node has {biggest} devices)")


def _free_slots(nodes: list[NodeSpec]) -> list[list[int]]:
    return [list(range(n.devices)) for n in nodes]


def _take(role: RoleSpec, free: list[list[int]]) -> tuple[Slot, ...]:
    """Whole TP groups, each on one node, filling nodes in order."""
    slots: list[Slot] = []
    for _ in range(role.world_size // role.tp):
        node = next((i for i, f in enumerate(free) if len(f) >= role.tp), None)
        if node is None:
            left = sum(len(f) for f in free)
            raise PlacementError(
                f"{role.name}: needs {role.world_size} devices in TP groups of {role.tp}; "
                f"the cluster has {left} free device(s) left for it")
        slots.extend(Slot(node, free[node].pop(0)) for _ in range(role.tp))
    return tuple(slots)


def plan_placement(roles: list[RoleSpec], nodes: list[NodeSpec],
                   colocate: bool = False) -> PlacementPlan:
    """Assign every rank of every role to a (node, device)."""
    _validate(roles, nodes)
    if not colocate:
        free = _free_slots(nodes)
        return PlacementPlan({r.name: _take(r, free) for r in roles}, colocated=False)
    # Colocated: lay out the largest role in node-local groups of the largest TP, then give
    # every role the prefix of those slots (ranks 0..w-1). A smaller TP that divides the
    # largest splits those groups, so its TP groups stay node-local too.
    anchor = max(roles, key=lambda r: r.world_size)
    group = max(r.tp for r in roles)
    if any(group % r.tp for r in roles) or anchor.world_size % group:
        raise PlacementError("colocated roles need TP sizes that divide each other and the "
                             "largest role's world size")
    base = _take(RoleSpec(anchor.name, anchor.world_size, group), _free_slots(nodes))
    return PlacementPlan({r.name: base[: r.world_size] for r in roles}, colocated=True)
