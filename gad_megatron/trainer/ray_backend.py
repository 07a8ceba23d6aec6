"""Roles as Ray worker groups, and the rollout engine as a Ray actor.

Ray is only the carrier here: the worker classes are the same plain classes the inline
backend runs. Weights reach the engine by broadcast over a weight group of their own
(resharding/broadcast.py), from the actor's sending rank into the engine's process(es), so
no bucket travels through Ray's object store.
"""

from __future__ import annotations

from gad_megatron.config import GADConfig
from gad_megatron.trainer.roles import Role, Roles
from gad_megatron.trainer.setup import RunInputs
from gad_megatron.workers.discriminator import DiscriminatorWorker
from gad_megatron.workers.policy import ActorWorker, ReferenceWorker


class EngineHost:
    """Holds one rollout engine in its own process (a Ray actor), asleep between uses when
    `sleep_when_idle` (see rollout/managed.py)."""

    def __init__(self, kind: str, hf_dir: str, tp: int, eos_id: int, pad_id: int,
                 options: dict, sleep_when_idle: bool):
        import os

        import torch

        from gad_megatron.rollout import make_engine
        from gad_megatron.rollout.managed import SleepingEngine

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        engine = make_engine(kind, hf_dir, tp=tp, eos_id=eos_id, pad_id=pad_id, **options)
        self.engine = SleepingEngine(engine, sleep_when_idle)

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def weight_receivers(self) -> int:
        return self.engine.weight_receivers

    def join_weight_group(self, addr: str, port: int, world: int, backend: str) -> None:
        self.engine.join_weight_group(addr, port, world, 1, backend)

    def receive_weights(self) -> tuple[int, int]:
        return self.engine.receive_weights()

    def pid(self) -> int:
        import os

        return os.getpid()

    def where(self) -> tuple[str, int]:
        """(node address, pid) of this engine's process."""
        import os

        import ray

        return ray.util.get_node_ip_address(), os.getpid()


class _Started:
    """A generation running on the engine actor."""

    def __init__(self, ref, timeout_s: float):
        self.ref, self.timeout_s = ref, timeout_s

    def result(self):
        from gad_megatron.cluster.group import wait_for

        return wait_for("rollout", [self.ref], self.timeout_s, call="generate")[0]


def engine_env(local: bool, gpu_ids: list | None = None) -> dict[str, str]:
    """The engine actor's environment: the workers' own (`worker_env`: socket interfaces
    forced to `lo` only on a loopback-only cluster, else the cluster's own or NCCL's choice),
    plus, for a colocated engine that drives several bundles' GPUs, those GPUs made visible
    (Ray would narrow CUDA_VISIBLE_DEVICES to the one GPU of the actor's own bundle)."""
    from gad_megatron.cluster.runtime import worker_env

    env = worker_env(local=local)
    if gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
        env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    return env


def _bundle_gpu_ids() -> list:
    import ray

    return [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", ())]


def _probe_gpus(pg, bundles: tuple[int, ...], timeout_s: float) -> list[str]:
    """The physical GPU ids of `bundles` of a whole-GPU reservation (a tiny task on each)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from gad_megatron.cluster.group import wait_for

    probe = ray.remote(num_cpus=0, num_gpus=0.001)(_bundle_gpu_ids)
    refs = [probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=b)).remote() for b in bundles]
    return [ids[0] for ids in wait_for("rollout", refs, timeout_s)]


class RayRollout:
    """The engine as one Ray actor, seated where the placement plan put the rollout role:
    its own reservation of its TP GPUs (disaggregated), or the bundle of its rank 0 in the
    colocated reservation, with its ranks' GPUs made visible."""

    def __init__(self, cfg: GADConfig, inputs: RunInputs, placement, pg=None):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from gad_megatron.cluster.group import reserve
        from gad_megatron.cluster.runtime import is_local_cluster
        from gad_megatron.rollout.managed import engine_options

        self.timeout_s = cfg.run.worker_timeout_s
        self.bucket_bytes = cfg.rollout.bucket_mb << 20
        self.backend = "nccl" if cfg.run.use_gpus else "gloo"
        self.joined = False
        self.pg, self.owns_pg = pg, pg is None
        if pg is None:
            self.pg = reserve(placement.bundles, f"rollout-{id(self)}", self.timeout_s, "rollout")
        seat = placement.seats[0]
        gpu_ids = None
        if placement.use_gpus and len(seat.devices) > 1:
            gpu_ids = _probe_gpus(self.pg, seat.devices, self.timeout_s)
        options = engine_options(cfg.rollout.engine, cfg.model.dtype, cfg.run.use_gpus,
                                 cfg.rollout.gpu_memory_utilization, cfg.rollout.deterministic)
        remote = ray.remote(EngineHost).options(
            num_cpus=seat.cpus, num_gpus=seat.gpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=seat.bundle),
            runtime_env={"env_vars": engine_env(is_local_cluster(), gpu_ids)})
        self.handle = remote.remote(cfg.rollout.engine, inputs.hf_dir, cfg.rollout.tp,
                                    inputs.eos_id, inputs.pad_id, options,
                                    cfg.run.colocate or cfg.rollout.sleep_when_idle)

    def generate(self, *args, **kwargs):
        return self.start_generate(*args, **kwargs).result()

    def start_generate(self, *args, **kwargs) -> "_Started":
        """The generation begun on the engine; `.result()` waits for it. The engine runs its
        calls in order, so a weight sync asked for meanwhile waits for this generation."""
        return _Started(self.handle.generate.remote(*args, **kwargs), self.timeout_s)

    def where(self) -> tuple[str, int]:
        from gad_megatron.cluster.group import wait_for

        return wait_for("rollout", [self.handle.where.remote()], self.timeout_s)[0]

    def _join(self, actor: Role) -> None:
        """Open the weight group: the actor's sending rank as rank 0, the engine's
        receivers after it (once, before the first sync)."""
        from gad_megatron.cluster.group import wait_for

        addr, port = next(a for a in actor.call_all("open_weight_port") if a is not None)
        world = 1 + wait_for("rollout", [self.handle.weight_receivers.remote()],
                             self.timeout_s)[0]
        joining = self.handle.join_weight_group.remote(addr, port, world, self.backend)
        actor.call_all("join_weight_group", addr, port, world, self.backend, self.timeout_s)
        wait_for("rollout", [joining], self.timeout_s, call="join_weight_group")
        self.joined = True

    def sync_from(self, actor: Role) -> tuple[int, int]:
        """Broadcast the actor's weights straight into the engine's process(es) over the
        weight group: no bucket goes through Ray's object store. Returns the (buckets,
        bytes) the engine received."""
        from gad_megatron.cluster.group import wait_for

        if not self.joined:
            self._join(actor)
        receiving = self.handle.receive_weights.remote()
        try:
            # Raises, naming the tensor, when the engine refuses the manifest.
            actor.call_with_weights("sync_weights_to_group", self.bucket_bytes)
        except Exception:
            self._engine_failure(receiving)  # an engine that died mid-sync is the cause
            raise
        return tuple(wait_for("rollout", [receiving], self.timeout_s,
                              call="receive_weights")[0])

    def _engine_failure(self, receiving) -> None:
        """Raise the engine's own error when its side of the sync has failed: the sender
        then only saw the broadcast break, and the run must name the role that died."""
        import ray

        from gad_megatron.cluster.group import wait_for

        ready, _ = ray.wait([receiving], timeout=5.0)
        if ready:
            wait_for("rollout", ready, self.timeout_s, call="receive_weights")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        ray.kill(self.handle)
        if self.owns_pg:
            remove_placement_group(self.pg)


def role_specs(cfg: GADConfig, inputs: RunInputs) -> list:
    """The placement demand of this run's roles (only the roles the stage builds)."""
    from gad_megatron.cluster.placement import RoleSpec

    specs = [RoleSpec("actor", cfg.actor.parallel.world_size, cfg.actor.parallel.tp)]
    if inputs.discriminator is not None:
        par = cfg.discriminator.parallel
        specs.append(RoleSpec("discriminator", par.world_size, par.tp))
    if inputs.reference is not None:
        par = cfg.reference.parallel
        specs.append(RoleSpec("reference", par.world_size, par.tp))
    # One engine actor driving its own TP workers on `rollout.tp` devices of one node.
    specs.append(RoleSpec("rollout", cfg.rollout.tp, cfg.rollout.tp, engine=True))
    return specs


def check_placement(cfg: GADConfig, inputs: RunInputs):
    """Where every rank goes; refuses, before any worker starts, a layout the Ray cluster
    cannot hold."""
    from gad_megatron.cluster.placement import plan_placement
    from gad_megatron.cluster.runtime import cluster_nodes

    return plan_placement(role_specs(cfg, inputs), cluster_nodes(cfg.run.use_gpus),
                          colocate=cfg.run.colocate, use_gpus=cfg.run.use_gpus)


def report_placement(groups: list, rollout: RayRollout) -> None:
    """One line per rank saying where it runs: a multi-node job's log shows the spread."""
    for g in groups:
        for info in g.ranks:
            print(f"worker {g.role} rank {info.rank} on node {info.node} (pid {info.pid})",
                  flush=True)
    node, pid = rollout.where()
    print(f"worker rollout rank 0 on node {node} (pid {pid})", flush=True)


def start_ray_roles(cfg: GADConfig, inputs: RunInputs, total_steps: int) -> Roles:
    import os

    import ray
    from ray.util.placement_group import remove_placement_group

    from gad_megatron.cluster.group import RayWorkerGroup, reserve
    from gad_megatron.cluster.placement import COLOCATED
    from gad_megatron.cluster.runtime import start_ray, stop_ray

    owns_ray = not ray.is_initialized()  # a caller that started Ray (the demo) keeps it
    start_ray(cfg.run)

    def stop_if_owned() -> None:
        if owns_ray:
            stop_ray()

    try:
        plan = check_placement(cfg, inputs)
    except BaseException:
        stop_if_owned()
        raise
    seed, timeout, groups = cfg.train.seed, cfg.run.worker_timeout_s, []
    shared = None  # colocated: the one reservation every role's actors sit in

    def group(role, cls, par, args):
        g = RayWorkerGroup(role, cls, par.world_size, args, plan.role(role), timeout, pg=shared)
        groups.append(g)
        return Role(role, g, par, offload=cfg.run.colocate and cfg.run.offload_when_colocated)

    def release_shared() -> None:
        if shared is not None:
            remove_placement_group(shared)

    try:
        if plan.colocated:
            shared = reserve(plan.bundles(COLOCATED), f"colocated-{os.getpid()}", timeout)
        actor = group("actor", ActorWorker, cfg.actor.parallel,
                      (cfg.actor, inputs.actor, inputs.pad_id, seed, total_steps))
        disc = ref = None
        if inputs.discriminator is not None:
            disc = group("discriminator", DiscriminatorWorker, cfg.discriminator.parallel,
                         (cfg.discriminator, inputs.discriminator, inputs.pad_id, inputs.eos_id,
                          seed, total_steps))
        if inputs.reference is not None:
            ref = group("reference", ReferenceWorker, cfg.reference.parallel,
                        (cfg.reference, inputs.reference, inputs.pad_id, seed))
        rollout = RayRollout(cfg, inputs, plan.role("rollout"), shared)
        report_placement(groups, rollout)
    except BaseException:
        for g in groups:
            g.shutdown()
        release_shared()
        stop_if_owned()
        raise

    def shutdown() -> None:
        rollout.shutdown()
        for g in groups:
            g.shutdown()
        release_shared()
        stop_if_owned()

    return Roles(actor, rollout, disc, ref, shutdown)
