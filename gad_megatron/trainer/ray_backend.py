"""Roles as Ray worker groups, and the rollout engine as a Ray actor.

Ray is only the carrier here: the worker classes are the same plain classes the inline
backend runs, and weights reach the engine through the resharding transport interface.
"""

from __future__ import annotations

from gad_megatron.config import GADConfig
from gad_megatron.trainer.backends import Roles
from gad_megatron.trainer.roles import Role
from gad_megatron.trainer.setup import RunInputs
from gad_megatron.workers.discriminator import DiscriminatorWorker
from gad_megatron.workers.policy import ActorWorker, ReferenceWorker


class EngineHost:
    """Holds one rollout engine in its own process (a Ray actor)."""

    def __init__(self, kind: str, hf_dir: str, tp: int, eos_id: int, pad_id: int):
        import os

        import torch

        from gad_megatron.rollout import make_engine

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.engine = make_engine(kind, hf_dir, tp=tp, eos_id=eos_id, pad_id=pad_id)

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def update_weights(self, bucket) -> int:
        self.engine.update_weights(bucket)
        return len(bucket)

    def pid(self) -> int:
        import os

        return os.getpid()

    def where(self) -> tuple[str, int]:
        """(node address, pid) of this engine's process."""
        import os

        import ray

        return ray.util.get_node_ip_address(), os.getpid()


class RaySender:
    """Ships one bucket of HF-named tensors to the engine actor (called on the actor's
    sending rank, inside its Ray worker process)."""

    def __init__(self, handle, timeout_s: float):
        self.handle, self.timeout_s = handle, timeout_s

    def __call__(self, bucket) -> None:
        import ray

        ray.get(self.handle.update_weights.remote(bucket), timeout=self.timeout_s)


class RayRollout:
    def __init__(self, cfg: GADConfig, inputs: RunInputs):
        import ray

        from gad_megatron.cluster.runtime import worker_env

        self.timeout_s = cfg.run.worker_timeout_s
        self.bucket_bytes = cfg.rollout.bucket_mb << 20
        remote = ray.remote(num_cpus=1, num_gpus=1 if cfg.run.use_gpus else 0)(EngineHost)
        self.handle = remote.options(runtime_env={"env_vars": worker_env()}).remote(
            cfg.rollout.engine, inputs.hf_dir, cfg.rollout.tp, inputs.eos_id, inputs.pad_id)

    def generate(self, *args, **kwargs):
        from gad_megatron.cluster.group import wait_for

        return wait_for("rollout", [self.handle.generate.remote(*args, **kwargs)],
                        self.timeout_s)[0]

    def where(self) -> tuple[str, int]:
        from gad_megatron.cluster.group import wait_for

        return wait_for("rollout", [self.handle.where.remote()], self.timeout_s)[0]

    def sync_from(self, actor: Role) -> None:
        from gad_megatron.resharding.transport import CallbackTransport

        transport = CallbackTransport(RaySender(self.handle, self.timeout_s))
        actor.call_all("sync_weights", transport, self.bucket_bytes)

    def shutdown(self) -> None:
        import ray

        ray.kill(self.handle)


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
    specs.append(RoleSpec("rollout", cfg.rollout.tp, cfg.rollout.tp))
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
    from gad_megatron.cluster.group import RayWorkerGroup
    from gad_megatron.cluster.runtime import start_ray, stop_ray

    import ray

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

    def group(role, cls, par, args):
        g = RayWorkerGroup(role, cls, par.world_size, args, plan.role(role), timeout)
        groups.append(g)
        return Role(role, g, par)

    try:
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
        rollout = RayRollout(cfg, inputs)
        report_placement(groups, rollout)
    except BaseException:
        for g in groups:
            g.shutdown()
        stop_if_owned()
        raise

    def shutdown() -> None:
        rollout.shutdown()
        for g in groups:
            g.shutdown()
        stop_if_owned()

    return Roles(actor, rollout, disc, ref, shutdown)
