"""Methods mixed into each vLLM worker process (`worker_extension_cls`): weight sync over a
`WeightGroup`, and reading the weights back for tests.

vLLM calls these through `LLM.collective_rpc("<name>", args=...)`, with plain arguments
(addresses, ints) only: tensors never travel through vLLM's RPC serialiser, which turns them
into Python lists (measured: `load_weights` then fails with "'list' object has no attribute
'dtype'"). They arrive by broadcast on the weight group instead, one bucket at a time, and
go into the model's own `load_weights`, which fuses q/k/v and gate/up and cuts this worker's
TP shard itself.

This module imports neither vLLM (unless GAD_VLLM_KEEP_WEIGHTS is set) nor the rest of the
trainer at import time: vLLM imports it by name inside its worker processes.
"""

from __future__ import annotations

import json
import os

KEEP_WEIGHTS_ENV = "GAD_VLLM_KEEP_WEIGHTS"


def _keep_cpu_linear_weights() -> None:
    """Tests only (GAD_VLLM_KEEP_WEIGHTS=1): vLLM's CPU linear layers pack their weight
    for oneDNN and then drop the parameter (an empty tensor is left), so nothing could be
    read back. This keeps the parameter beside the packed copy: the kernel is the same one,
    built from the same weight, so what the engine computes does not change, only what it
    keeps in memory."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_gad_keeps_weight", False):
        return

    def keep(layer, remove_weight: bool) -> None:
        original(layer, remove_weight=False)

    keep._gad_keeps_weight = True
    utils.dispatch_cpu_unquantized_gemm = keep


if os.environ.get(KEEP_WEIGHTS_ENV) == "1":
    _keep_cpu_linear_weights()


class WeightSyncExtension:
    """Mixed into vLLM's Worker class: `self` is the worker (model_runner, model_config,
    rank are vLLM's)."""

    def gad_join_weight_group(self, addr: str, port: int, world: int, first_rank: int,
                              backend: str, timeout_s: float) -> int:
        """Join the weight group as rank `first_rank` + this worker's rank. Collective with
        the sender and the other workers."""
        from gad_megatron.resharding.weight_group import WeightGroup

        rank = first_rank + int(self.rank)
        self._gad_group = WeightGroup(addr, port, world, rank, backend, timeout_s)
        return rank

    def gad_receive_weights(self) -> dict:
        """Take one sync from the group's rank 0 into the model: {"buckets", "bytes"}, or
        {"refused": why} when the manifest did not fit (nothing was loaded then)."""
        from gad_megatron.resharding.broadcast import receive_weights
        from gad_megatron.resharding.transport import dtype_name
        from gad_megatron.rollout.receiver import checkpoint_manifest

        if getattr(self, "_gad_expected", None) is None:
            self._gad_expected = checkpoint_manifest(self.model_config.model,
                                                     dtype_name(self.model_config.dtype))
        # vLLM's layerwise reload: `begin` puts every layer back in its checkpoint form,
        # each layer is processed again (fused, repacked for the CPU GEMM kernels) once all
        # its weights have arrived, and `end` finishes the rest. A bucket may therefore end
        # anywhere, even between q and k of one layer; the whole sync is one session.
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload, initialize_layerwise_reload)

        from gad_megatron.resharding.execute import SyncMismatch

        model = self.model_runner.model
        try:
            buckets, nbytes = receive_weights(
                self._gad_group, lambda bucket: model.load_weights(weights=iter(bucket)),
                self._gad_expected, begin=lambda: initialize_layerwise_reload(model),
                end=lambda: finalize_layerwise_reload(model, self.model_config))
        except SyncMismatch as err:
            # An answer, not a raise: with several workers, vLLM hands a failed call's
            # late answers to the next call, which would then fail for no reason of its own.
            return {"refused": str(err)}
        return {"buckets": buckets, "bytes": nbytes}

    def gad_read_weights(self) -> str:
        """This worker's parameters as vLLM holds them (fused, TP-sharded), JSON of
        name -> [dtype, shape, hex bytes]: for tests that compare them bitwise."""
        import torch

        from gad_megatron.resharding.transport import dtype_name

        out = {}
        for name, p in self.model_runner.model.named_parameters():
            t = p.detach().cpu().contiguous()
            out[name] = [dtype_name(t.dtype), list(t.shape),
                         t.reshape(-1).view(torch.uint8).numpy().tobytes().hex()]
        return json.dumps(out)
