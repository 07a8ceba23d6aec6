"""Start or join Ray; a local Ray listens and advertises on 127.0.0.1 only."""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
# Ray reads this when first imported: with it at 0, a node that is not told its address
# falls back to loopback instead of probing for the host's routable one.
_CLUSTER_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayStartError(RuntimeError):
    """Ray could not be started the way the run asked (e.g. it escaped loopback)."""


def worker_env(local: bool = True) -> dict[str, str]:
    """Environment every worker process gets (rendezvous on loopback when local; one thread
    per rank on CPU so that several ranks share few cores without oversubscription)."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning"}
    if local:
        env.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
        env[_CLUSTER_FLAG] = "0"
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "GAD_FORCE_CPU_PATCHES"):
        if key in os.environ:  # the cluster's own interface settings win
            env[key] = os.environ[key]
    return env


def _pin_local_ray() -> None:
    os.environ[_CLUSTER_FLAG] = "0"  # for the raylet and workers this driver starts
    import ray._private.ray_constants as constants

    # Ray may have been imported before this call (the flag is read at import): correct the
    # already-read value too, so no code path of this driver looks beyond loopback.
    constants.ENABLE_RAY_CLUSTER = False


def start_ray(run_cfg) -> None:
    """Join `run_cfg.ray_address`, or start a local Ray on 127.0.0.1 with `run_cfg.num_cpus`
    logical CPU slots (0: Ray's own count). A Ray this process already started is kept."""
    if not run_cfg.ray_address:
        _pin_local_ray()
    import ray

    if ray.is_initialized():
        return
    if run_cfg.ray_address:
        # On a host with several Ray nodes (or interfaces) the launcher says which node this
        # driver is on (slurm/gad.sbatch sets GAD_RAY_NODE_IP to the node's Slurm address).
        ray.init(address=run_cfg.ray_address, include_dashboard=False,
                 _node_ip_address=os.environ.get("GAD_RAY_NODE_IP") or None,
                 runtime_env={"env_vars": worker_env(local=False)})
        return
    ray.init(address="local", num_cpus=run_cfg.num_cpus or None, include_dashboard=False,
             _node_ip_address=LOOPBACK, runtime_env={"env_vars": worker_env()},
             log_to_driver=True)
    outside = [a for a in node_addresses() if not a.startswith("127.")]
    if outside:
        ray.shutdown()
        raise RayStartError(f"local Ray advertised non-loopback addresses {outside}; stopped")


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def node_addresses() -> list[str]:
    """NodeManagerAddress of every live node."""
    import ray

    return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]


def is_local_cluster() -> bool:
    """Whether every live Ray node is this host on loopback (then ranks rendezvous there)."""
    return all(a.startswith("127.") for a in node_addresses())


def cluster_nodes(use_gpus: bool) -> list:
    """The live nodes as placement NodeSpecs (name = the node's address), nodes without the
    device kind in use left out."""
    import ray

    from gad_megatron.cluster.placement import NodeSpec

    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        if not n.get("Alive") or (use_gpus and res.get("GPU", 0) < 1):
            continue
        nodes.append(NodeSpec(n["NodeManagerAddress"], int(res.get("GPU", 0)),
                              int(res.get("CPU", 0))))
    return nodes
