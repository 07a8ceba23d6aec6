"""Start or join Ray, pinned to loopback when local."""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"


def worker_env(local: bool = True) -> dict[str, str]:
    """Environment every worker process gets (rendezvous on loopback when local; one thread
    per rank on CPU so that several ranks share few cores without oversubscription)."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning"}
    if local:
        env.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "GAD_FORCE_CPU_PATCHES"):
        if key in os.environ:  # the cluster's own interface settings win
            env[key] = os.environ[key]
    return env


def start_ray(run_cfg) -> None:
    """Join `run_cfg.ray_address`, or start a local Ray that listens on 127.0.0.1 only."""
    if not run_cfg.ray_address:
        # Without this Ray advertises the host's routable address even when told 127.0.0.1;
        # Ray reads it when first imported, so set it before the import (measured here).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if run_cfg.ray_address:
        ray.init(address=run_cfg.ray_address, include_dashboard=False,
                 runtime_env={"env_vars": worker_env(local=False)})
        return
    ray.init(num_cpus=run_cfg.num_cpus or None, include_dashboard=False,
             _node_ip_address=LOOPBACK, runtime_env={"env_vars": worker_env()},
             log_to_driver=True)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def node_addresses() -> list[str]:
    import ray

    return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
