"""Ray placement of worker groups. Worker classes never import Ray; this package carries them.

- `placement`: pure planning of which node and device each rank of each role gets;
- `dispatch`: pure batch splitting over DP replicas and Megatron's rank coordinates;
- `group`: `RayWorkerGroup`, one Ray actor per rank, failures as `WorkerError`;
- `runtime`: start a loopback-only local Ray, or join a cluster.

Ray is imported lazily (inside functions), so the pure modules work without it.
"""
