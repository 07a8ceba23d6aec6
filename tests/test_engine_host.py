"""How the trainer builds and drives its rollout engine (issue 14, defects 8 and 9): pure
functions of the config, and the hf engine built with them (real, on CPU). The sleep/wake
order is tested against the SGLang boundary in test_sglang_adapter.py."""

from __future__ import annotations

import pytest
import torch

from gad_megatron.rollout.managed import engine_options
from gad_megatron.trainer.ray_backend import engine_env


@pytest.mark.parametrize("kind,dtype,gpus,want", [
    # hf on a GPU machine: on the actor's GPU in the run's dtype (before: CPU, fp32)
    ("hf", "bfloat16", True, {"device": "cuda", "dtype": torch.bfloat16}),
    ("hf", "bfloat16", False, {"device": "cpu", "dtype": torch.float32}),
    # vLLM/SGLang get the configured memory share (before: never passed)
    ("vllm", "bfloat16", True, {"dtype": "bfloat16", "gpu_memory_utilization": 0.35}),
    ("sglang", "float16", True, {"dtype": "float16", "gpu_memory_utilization": 0.35,
                                 "deterministic": True}),
])
def test_engine_options(kind, dtype, gpus, want):
    assert engine_options(kind, dtype, gpus, 0.35) == want


def test_the_hf_engine_accepts_its_options(tmp_path):
    from gad_megatron.rollout import make_engine
    from tests.tiny_models import make_hf_model

    model_dir = make_hf_model("qwen3", tmp_path / "m")
    engine = make_engine("hf", model_dir, eos_id=99, pad_id=0,
                         **engine_options("hf", "bfloat16", False, 0.5))
    assert next(engine.model.parameters()).dtype == torch.float32
    assert engine.device == torch.device("cpu")


def test_engine_env_takes_socket_interfaces_from_the_environment(monkeypatch):
    # Before: the engine actor got worker_env() with its local=True default, so NCCL and
    # gloo were forced onto `lo` even on a multi-node cluster.
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    env = engine_env(local=False)
    assert "NCCL_SOCKET_IFNAME" not in env and "GLOO_SOCKET_IFNAME" not in env
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    env = engine_env(local=False)
    assert env["NCCL_SOCKET_IFNAME"] == "ib0" and env["GLOO_SOCKET_IFNAME"] == "eth1"
    monkeypatch.delenv("NCCL_SOCKET_IFNAME")
    assert engine_env(local=True)["NCCL_SOCKET_IFNAME"] == "lo"  # loopback-only cluster


def test_engine_env_shows_a_colocated_engine_its_tp_gpus():
    env = engine_env(local=False, gpu_ids=["3", "5"])
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in engine_env(local=False)


def test_cpu_thread_binding_gives_each_vllm_worker_cores_of_its_own():
    from gad_megatron.rollout.vllm_engine import cpu_thread_binding

    assert cpu_thread_binding([0, 1], 2) == "0|1"
    assert cpu_thread_binding([3, 0, 2, 1, 4], 2) == "0,1|2,3"  # sorted; a leftover core idles
    with pytest.raises(ValueError, match="binds each of its 4 workers.*may use 2 core"):
        cpu_thread_binding([0, 1], 4)
