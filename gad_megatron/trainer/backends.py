"""Start the roles of a run: all in this process ("inline": one rank per role, e.g. one GPU
without Ray, or CPU tests) or as Ray worker groups ("ray")."""

from __future__ import annotations

from gad_megatron.config import ConfigError, GADConfig
from gad_megatron.trainer.roles import InlineGroup, Ready, Role, Roles
from gad_megatron.trainer.setup import RunInputs
from gad_megatron.workers.discriminator import DiscriminatorWorker
from gad_megatron.workers.policy import ActorWorker, ReferenceWorker


class LocalRollout:
    """A rollout engine held by this process. `engine` is a rollout/managed.py
    SleepingEngine (asleep between uses when enabled). Weights arrive through an in-process
    transport, or, for an engine whose workers are processes of their own (vLLM), by
    broadcast to them over a loopback weight group with this process sending."""

    def __init__(self, engine, bucket_bytes: int, backend: str = "gloo"):
        self.engine, self.bucket_bytes, self.backend = engine, bucket_bytes, backend
        self._link = None

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def start_generate(self, *args, **kwargs) -> Ready:
        # This process also trains: the generation runs now (no overlap, same semantics).
        return Ready(self.generate(*args, **kwargs))

    def sync_from(self, actor: Role) -> None:
        from gad_megatron.resharding.transport import InProcessTransport
        from gad_megatron.rollout.receiver import LocalLink, has_own_receivers

        if has_own_receivers(self.engine.engine):
            if self._link is None:
                self._link = LocalLink(self.engine, self.backend)
            self._link.sync(lambda t: actor.call_all("sync_weights", t, self.bucket_bytes))
            return
        actor.call_all("sync_weights", InProcessTransport(self.engine), self.bucket_bytes)
        self.engine.end_sync()


def _make_engine(cfg: GADConfig, inputs: RunInputs):
    from gad_megatron.rollout import make_engine
    from gad_megatron.rollout.managed import SleepingEngine, engine_options

    options = engine_options(cfg.rollout.engine, cfg.model.dtype, cfg.run.use_gpus,
                             cfg.rollout.gpu_memory_utilization, cfg.rollout.deterministic)
    engine = make_engine(cfg.rollout.engine, inputs.hf_dir, tp=cfg.rollout.tp,
                         eos_id=inputs.eos_id, pad_id=inputs.pad_id, **options)
    # Inline, every role shares this process's one device with the engine.
    return SleepingEngine(engine, cfg.run.use_gpus or cfg.rollout.sleep_when_idle)


def start_inline(cfg: GADConfig, inputs: RunInputs, total_steps: int) -> Roles:
    for name, par in (("actor", cfg.actor.parallel), ("discriminator", cfg.discriminator.parallel),
                      ("reference", cfg.reference.parallel)):
        if par.world_size != 1:
            raise ConfigError(f"the inline backend runs one rank per role; {name}.parallel has "
                              f"{par.world_size} (use the ray backend)")
    seed = cfg.train.seed
    actor = Role("actor", InlineGroup(ActorWorker, cfg.actor, inputs.actor, inputs.pad_id, seed,
                                      total_steps), cfg.actor.parallel)
    disc = ref = None
    if inputs.discriminator is not None:
        disc = Role("discriminator", InlineGroup(
            DiscriminatorWorker, cfg.discriminator, inputs.discriminator, inputs.pad_id,
            inputs.eos_id, seed, total_steps), cfg.discriminator.parallel)
    if inputs.reference is not None:
        ref = Role("reference", InlineGroup(ReferenceWorker, cfg.reference, inputs.reference,
                                            inputs.pad_id, seed), cfg.reference.parallel)
    monitor = None
    if inputs.monitor is not None:
        monitor = Role("monitor", InlineGroup(
            DiscriminatorWorker, cfg.discriminator, inputs.monitor, inputs.pad_id,
            inputs.eos_id, seed, total_steps), cfg.discriminator.parallel)
    rollout = LocalRollout(_make_engine(cfg, inputs), cfg.rollout.bucket_mb << 20,
                           "nccl" if cfg.run.use_gpus else "gloo")
    return Roles(actor, rollout, disc, ref, lambda: None, monitor)


def start_roles(cfg: GADConfig, inputs: RunInputs, total_steps: int, backend: str) -> Roles:
    if backend == "inline":
        return start_inline(cfg, inputs, total_steps)
    if backend == "ray":
        from gad_megatron.trainer.ray_backend import start_ray_roles

        return start_ray_roles(cfg, inputs, total_steps)
    raise ConfigError(f"unknown backend {backend!r}; use 'ray' or 'inline'")
