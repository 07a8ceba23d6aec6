"""Where every rank of every role runs: a pure function of the layouts and the cluster.

No Ray here: the plan is computed (and table-tested) first, then `RayWorkerGroup` turns each
role's slice into placement-group bundles pinned to the planned nodes.

Rules:
- a device is a GPU (`use_gpus`) or a logical CPU slot (CPU mode, tests and demos);
- disaggregated: each role gets devices of its own, roles in the given order, ranks packed
  node by node;
- colocated: every role (actor, discriminator, reference, rollout) time-shares the same
  devices, the largest role's; rank r of every role sits on the same device;
- Ray reservations (`Bundle`, `Seat`): a bundle is always one whole device (or, for an
  engine's own reservation, its TP devices together), so Ray never puts two bundles on one
  GPU. Colocated roles share ONE reservation; rank r of every role takes a fraction of bundle
  r, so rank r of every role is on device r, and ranks of one role are on distinct devices.
  (Fractional bundles per role let Ray's best fit stack ranks 0..k of one role on GPU 0,
  where NCCL refuses duplicate devices.)
- an engine role (`RoleSpec.engine`: vLLM/SGLang with its own TP) is ONE actor that drives
  all its ranks' devices: disaggregated, its bundle holds its TP devices; colocated, it sits
  on the bundle of its rank 0 and is shown the devices of its ranks' bundles;
- a tensor-parallel group never spans nodes (its all-reduces need the intra-node fabric), so a
  TP group larger than a node is refused;
- too few devices is refused naming the role and the counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """Ranks that must share a node (consecutive ranks form a TP group, Megatron's order)."""
    engine: bool = False
    """One actor drives all the ranks' devices (a rollout engine spawning its own TP workers)."""


@dataclass(frozen=True)
class NodeSpec:
    """One node of the cluster."""

    name: str
    """The node's address (Ray's NodeManagerAddress), or any label in tests."""
    gpus: int = 0
    cpus: int = 0

    def devices(self, use_gpus: bool) -> int:
        return self.gpus if use_gpus else self.cpus


@dataclass(frozen=True)
class Slot:
    """One rank's place: node index (into the plan's nodes) and device index on that node."""

    node: int
    device: int


@dataclass(frozen=True)
class Bundle:
    """One Ray placement-group bundle: whole devices on one node."""

    node: str
    gpus: int
    """Whole GPUs (0 in CPU mode)."""
    cpus: float


@dataclass(frozen=True)
class Seat:
    """Where one Ray actor of a role sits in its reservation, and what it asks for."""

    bundle: int
    """Index into the reservation's bundles."""
    gpus: float
    """The actor's GPU ask from its bundle (1/share when colocated)."""
    cpus: float
    devices: tuple[int, ...]
    """Bundles whose devices the actor drives: its own, or an engine's TP bundles."""


COLOCATED = "colocated"
"""Name of the one reservation colocated roles share."""


@dataclass(frozen=True)
class RolePlacement:
    """One role's slice of a plan: what `RayWorkerGroup` needs to place its ranks."""

    role: str
    slots: tuple[Slot, ...]
    node_names: tuple[str, ...]
    """Name of the node of each rank (rank order)."""
    use_gpus: bool
    share: int
    """How many roles time-share each device (1 when disaggregated)."""
    reservation: str = ""
    """The reservation the role's actors sit in: COLOCATED (shared) or the role's own name."""
    bundles: tuple[Bundle, ...] = ()
    """That reservation's bundles."""
    seats: tuple[Seat, ...] = ()
    """One per actor: one per rank, or a single one for an engine role."""

    @property
    def world_size(self) -> int:
        return len(self.slots)

    def node_of(self, rank: int) -> str:
        return self.node_names[rank]

    def device_of(self, rank: int) -> int:
        """The rank's device index on its node (its local GPU, or CPU slot)."""
        return self.slots[rank].device

    def single_node(self) -> bool:
        return len(set(self.node_names)) == 1


@dataclass(frozen=True)
class PlacementPlan:
    roles: dict[str, tuple[Slot, ...]]
    """Per role, the slot of each rank (rank order)."""
    colocated: bool
    nodes: tuple[NodeSpec, ...] = ()
    use_gpus: bool = False
    engines: frozenset[str] = frozenset()
    """Roles placed as one actor driving all their devices (RoleSpec.engine)."""

    def devices_used(self) -> int:
        return len({s for slots in self.roles.values() for s in slots})

    def nodes_of(self, role: str) -> list[int]:
        return sorted({s.node for s in self.roles[role]})

    def node_name(self, index: int) -> str:
        return self.nodes[index].name if self.nodes else str(index)

    @property
    def share(self) -> int:
        return len(self.roles) if self.colocated else 1

    def role(self, name: str) -> RolePlacement:
        slots = self.roles[name]
        names = tuple(self.node_name(s.node) for s in slots)
        reservation = COLOCATED if self.colocated else name
        return RolePlacement(name, slots, names, self.use_gpus, self.share, reservation,
                             self.bundles(reservation), self.seats(name))

    def bundles(self, reservation: str) -> tuple[Bundle, ...]:
        """The bundles of one reservation: COLOCATED, or a role's own (disaggregated)."""
        gpu = 1 if self.use_gpus else 0
        if reservation == COLOCATED:
            # The largest role's slots are every device used; one whole device per bundle.
            anchor = max(self.roles.values(), key=len)
            return tuple(Bundle(self.node_name(s.node), gpu, 1.0) for s in anchor)
        slots = self.roles[reservation]
        if reservation in self.engines:  # its TP devices together, on one node (plan rule)
            return (Bundle(self.node_name(slots[0].node), gpu * len(slots), 1.0),)
        return tuple(Bundle(self.node_name(s.node), gpu, 1.0) for s in slots)

    def seats(self, name: str) -> tuple[Seat, ...]:
        """Where each actor of role `name` sits in its reservation."""
        slots, gpu = self.roles[name], 1.0 if self.use_gpus else 0.0
        if self.colocated:
            # Rank r of every role takes 1/share of bundle r (the anchor lays bundles out in
            # rank order, and every role's slots are a prefix of the anchor's).
            part = 1.0 / self.share
            if name in self.engines:
                return (Seat(0, gpu * part, part, tuple(range(len(slots)))),)
            return tuple(Seat(r, gpu * part, part, (r,)) for r in range(len(slots)))
        if name in self.engines:
            return (Seat(0, gpu * len(slots), 1.0, (0,)),)
        return tuple(Seat(r, gpu, 1.0, (r,)) for r in range(len(slots)))


def _as_list(roles: Mapping[str, RoleSpec] | Sequence[RoleSpec]) -> list[RoleSpec]:
    if not isinstance(roles, Mapping):
        return list(roles)
    out = []
    for key, spec in roles.items():
        if spec.name != key:
            raise PlacementError(f"role key {key!r} does not match its spec name {spec.name!r}")
        out.append(spec)
    return out


def _validate(roles: list[RoleSpec], sizes: list[int], kind: str) -> None:
    if not roles:
        raise PlacementError("no roles to place")
    if len({r.name for r in roles}) != len(roles):
        raise PlacementError(f"role names must be unique, got {[r.name for r in roles]}")
    if not sizes or max(sizes) < 1:
        raise PlacementError(f"the cluster has no {kind}s to place workers on")
    biggest = max(sizes)
    for r in roles:
        if r.world_size < 1 or r.tp < 1 or r.world_size % r.tp:
            raise PlacementError(f"{r.name}: world_size={r.world_size} must be a positive "
                                 f"multiple of tp={r.tp}")
        if r.tp > biggest:
            raise PlacementError(f"{r.name}: a TP group of {r.tp} does not fit on one node "
                                 f"(largest node has {biggest} {kind}s)")


def _take(role: RoleSpec, free: list[list[int]], kind: str, total: int) -> tuple[Slot, ...]:
    """Whole TP groups, each on one node, filling nodes in order."""
    slots: list[Slot] = []
    left = sum(len(f) for f in free)
    for _ in range(role.world_size // role.tp):
        node = next((i for i, f in enumerate(free) if len(f) >= role.tp), None)
        if node is None:
            why = f" (no node has {role.tp} free together)" if left >= role.world_size else ""
            raise PlacementError(
                f"{role.name}: needs {role.world_size} devices ({kind}s) in TP groups of "
                f"{role.tp}; the cluster has {left} of its {total} left for it{why}")
        slots.extend(Slot(node, free[node].pop(0)) for _ in range(role.tp))
    return tuple(slots)


def _colocated(roles: list[RoleSpec], sizes: list[int], kind: str) -> dict:
    # Lay out the largest role in node-local groups of the largest TP, then give every role
    # the prefix of those slots (ranks 0..w-1). A smaller TP that divides the largest splits
    # those groups, so its TP groups stay node-local too.
    anchor = max(roles, key=lambda r: r.world_size)
    group = max(r.tp for r in roles)
    if any(group % r.tp for r in roles) or anchor.world_size % group:
        raise PlacementError(
            "colocated roles need TP sizes that divide each other and the largest role's "
            f"world size; got " + ", ".join(f"{r.name} tp={r.tp} world_size={r.world_size}"
                                           for r in roles))
    free = [list(range(n)) for n in sizes]
    base = _take(RoleSpec(anchor.name, anchor.world_size, group), free, kind, sum(sizes))
    return {r.name: base[: r.world_size] for r in roles}


def plan_placement(roles: Mapping[str, RoleSpec] | Sequence[RoleSpec], nodes: list[NodeSpec],
                   colocate: bool = False, use_gpus: bool | None = None) -> PlacementPlan:
    """Assign every rank of every role to a (node, device).

    `roles` in placement order (a dict keyed by name, or a list). `use_gpus=None` places on
    GPUs when any node has one, else on CPU slots. Raises PlacementError naming the role and
    the counts when the layout does not fit.
    """
    specs = _as_list(roles)
    if use_gpus is None:
        use_gpus = any(n.gpus > 0 for n in nodes)
    kind = "GPU" if use_gpus else "CPU slot"
    sizes = [n.devices(use_gpus) for n in nodes]
    _validate(specs, sizes, kind)
    if colocate:
        placed = _colocated(specs, sizes, kind)
    else:
        free = [list(range(n)) for n in sizes]
        placed = {r.name: _take(r, free, kind, sum(sizes)) for r in specs}
    plan = PlacementPlan(placed, colocated=colocate, nodes=tuple(nodes), use_gpus=use_gpus,
                         engines=frozenset(r.name for r in specs if r.engine))
    if use_gpus:
        _check_cpus(plan)
    return plan


def _check_cpus(plan: PlacementPlan) -> None:
    """Every GPU rank also holds one CPU (its Ray actor); a node that reports CPUs must have
    enough of them for the ranks placed on it."""
    share = len(plan.roles) if plan.colocated else 1
    for index, node in enumerate(plan.nodes):
        ranks = sum(1 for slots in plan.roles.values() for s in slots if s.node == index)
        if node.cpus and ranks / share > node.cpus:
            raise PlacementError(f"node {node.name}: {ranks} ranks need {ranks / share:g} "
                                 f"CPUs, the node has {node.cpus}")
