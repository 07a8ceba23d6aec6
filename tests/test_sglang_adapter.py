"""The SGLang adapter against SGLang 0.5.23's Engine contract (issue 14, defects 1-3).

MOCK AT THE EXTERNAL BOUNDARY: SGLang cannot be installed on CPU, so `FakeSGLangEngine`
stands in for `sglang.Engine` only, with the behaviour its 0.5.23 source defines
(python/sglang/srt/entrypoints/engine.py, managers/scheduler_components/weight_updater.py):
- every weight call answers `(success, message)` (the tokenizer manager's tuple);
- `update_weights_from_tensor` outside `begin_weight_update()`/`end_weight_update()` fails
  and leaves the weights as they were;
- `release_memory_occupation` with `enable_memory_saver` frees the weights; unless
  `enable_weights_cpu_backup` is set, `resume_memory_occupation` gives them back as garbage;
- per-request `sampling_seed` is honoured only with `enable_deterministic_inference`.
Everything on our side of the boundary is the real adapter and the real SleepingEngine.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from gad_megatron.rollout.managed import SleepingEngine
from gad_megatron.rollout.sglang_engine import EngineCallFailed, SGLangEngine

SESSION_MSG = "update_weights_from_tensor requires an open begin_weight_update session"


class FakeSGLangEngine:
    """sglang.Engine 0.5.23, reduced to what the adapter calls (see the module docstring)."""

    SERVER_ARGS = {"model_path", "tp_size", "dtype", "mem_fraction_static",
                   "skip_tokenizer_init", "enable_memory_saver", "enable_weights_cpu_backup",
                   "enable_deterministic_inference"}

    def __init__(self, **server_args):
        unknown = set(server_args) - self.SERVER_ARGS
        if unknown:  # ServerArgs(**kwargs) raises TypeError on an unknown field
            raise TypeError(f"unexpected ServerArgs {sorted(unknown)}")
        self.args = server_args
        self.weights = {"w": torch.zeros(4)}
        self.session = False
        self.released = False
        self.calls: list[str] = []

    def begin_weight_update(self, selector: str = "all"):
        self.calls.append("begin")
        if self.session:
            return False, "begin_weight_update called while a session is already open"
        self.session = True
        return True, "Success"

    def end_weight_update(self):
        self.calls.append("end")
        if not self.session:
            return False, "end_weight_update called without begin_weight_update"
        self.session = False
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append("update")
        if not self.session:
            return False, SESSION_MSG
        if self.released:
            return False, "weights are released"
        for name, tensor in named_tensors:
            if name not in self.weights:
                return False, f"Failed to update parameter online: unknown {name}"
        for name, tensor in named_tensors:
            self.weights[name] = tensor.clone()
        return True, "Success"

    def release_memory_occupation(self, tags=None):
        self.calls.append("release")
        assert self.args.get("enable_memory_saver"), "memory saver is off"
        self.backup = ({k: v.clone() for k, v in self.weights.items()}
                       if self.args.get("enable_weights_cpu_backup") else None)
        self.weights = {k: torch.full_like(v, float("nan")) for k, v in self.weights.items()}
        self.released = True

    def resume_memory_occupation(self, tags=None):
        self.calls.append("resume")
        if self.backup is not None:
            self.weights = self.backup
        self.released = False

    def generate(self, input_ids, sampling_params, return_logprob=False):
        self.calls.append("generate")
        assert not self.released, "generate on released memory"
        outs = []
        for ids, params in zip(input_ids, sampling_params):
            seeded = self.args.get("enable_deterministic_inference")
            seed = params["sampling_seed"] if seeded else int.from_bytes(os.urandom(4), "little")
            g = torch.Generator().manual_seed(seed)
            bias = float(self.weights["w"].sum())  # the output depends on the weights
            toks = [int(torch.randint(0, 50, (1,), generator=g)) for _ in range(3)]
            outs.append({"output_ids": toks, "meta_info": {
                "output_token_logprobs": [(bias - 1.0, t, None) for t in toks],
                "finish_reason": {"type": "length"}}})
        return outs


@pytest.fixture
def sglang(monkeypatch):
    module = types.ModuleType("sglang")
    module.Engine = FakeSGLangEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    return module


def _logprob(engine) -> float:
    return engine.generate([[1, 2]], n=1, temperature=0.8, top_p=1.0, max_new_tokens=3,
                           seed=0).logprobs[0][0]


def test_weight_update_runs_in_a_session_and_lands(sglang):
    engine = SGLangEngine("/m", tp=2)
    engine.update_weights([("w", torch.ones(4))])
    assert engine.engine.calls == ["begin", "update", "end"]
    assert _logprob(engine) == pytest.approx(3.0)  # sum(w) - 1 with the new weights


def test_a_sessionless_update_is_refused_by_the_engine_as_the_adapter_must_know():
    fake = FakeSGLangEngine()
    assert fake.update_weights_from_tensor([("w", torch.ones(4))]) == (False, SESSION_MSG)
    assert torch.equal(fake.weights["w"], torch.zeros(4))  # silently stale before the fix


def test_a_failed_update_raises_and_closes_the_session(sglang):
    engine = SGLangEngine("/m")
    with pytest.raises(EngineCallFailed, match="update_weights_from_tensor failed: .*unknown"):
        engine.update_weights([("nope", torch.ones(4))])
    assert engine.engine.calls == ["begin", "update", "end"] and not engine.engine.session


def test_a_failed_begin_raises(sglang):
    engine = SGLangEngine("/m")
    engine.engine.session = True  # e.g. a session left open by an earlier crash
    with pytest.raises(EngineCallFailed, match="begin_weight_update failed"):
        engine.update_weights([("w", torch.ones(4))])


def test_engine_args_back_up_weights_and_honour_seeds(sglang):
    args = SGLangEngine("/m", tp=2, gpu_memory_utilization=0.4).engine.args
    assert args["enable_weights_cpu_backup"] and args["enable_memory_saver"]
    assert args["enable_deterministic_inference"] and args["mem_fraction_static"] == 0.4


@pytest.mark.parametrize("backup", [True, False])
def test_weights_survive_sleep_only_with_the_cpu_backup(sglang, backup):
    engine = SGLangEngine("/m", enable_weights_cpu_backup=backup)
    engine.update_weights([("w", torch.ones(4))])
    engine.sleep()
    engine.wake()
    got = _logprob(engine)
    assert (got == pytest.approx(3.0)) if backup else torch.isnan(torch.tensor(got))


def test_sleeping_engine_order_wake_sync_sleep_wake_generate_sleep(sglang):
    managed = SleepingEngine(SGLangEngine("/m"), enabled=True)
    fake = managed.engine.engine
    assert fake.calls == ["release"]  # asleep from the start: the trainer needs the memory
    managed.update_weights([("w", torch.ones(4))])
    managed.end_sync()
    assert fake.calls[1:] == ["resume", "begin", "update", "end", "release"]
    del fake.calls[:]
    assert managed.generate([[1]], n=1, temperature=0.8, top_p=1.0, max_new_tokens=3,
                            seed=0).logprobs[0][0] == pytest.approx(3.0)
    assert fake.calls == ["resume", "generate", "release"]


def test_an_update_while_asleep_is_refused_not_lost(sglang):
    engine = SGLangEngine("/m")
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.update_weights([("w", torch.ones(4))])


@pytest.mark.parametrize("deterministic", [True, False])
def test_seeds_reproduce_only_with_deterministic_inference(sglang, deterministic):
    engine = SGLangEngine("/m", deterministic=deterministic)
    runs = [engine.generate([[1, 2]], n=4, temperature=0.8, top_p=1.0, max_new_tokens=3,
                            seed=11).responses for _ in range(2)]
    assert (runs[0] == runs[1]) is deterministic


def test_sglang_receives_on_its_host_checked_against_its_checkpoint(sglang, tmp_path):
    """SGLang receives weight-group syncs in the process holding it (HostReceiver); the
    manifest is checked against the checkpoint's tensors in the engine's dtype."""
    from gad_megatron.rollout.receiver import HostReceiver, receiver_for
    from tests.tiny_models import make_hf_model

    model_dir = make_hf_model("qwen3", tmp_path / "m")
    engine = SGLangEngine(str(model_dir), dtype="bfloat16")
    assert isinstance(receiver_for(engine), HostReceiver)
    manifest = engine.weight_manifest()
    assert manifest["model.layers.0.mlp.gate_proj.weight"] == ((64, 32), "bfloat16")
    assert len(manifest) == 2 + 2 * 11 + 1  # embed, norm, lm_head; 11 tensors a layer


def test_a_checkpoint_that_stores_a_tied_head_anyway_is_not_asked_for_it(tmp_path):
    import json

    from safetensors.torch import save_file

    from gad_megatron.rollout.receiver import checkpoint_manifest

    save_file({"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert checkpoint_manifest(str(tmp_path), "float32") == {
        "model.embed_tokens.weight": ((4, 2), "float32")}
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert "lm_head.weight" in checkpoint_manifest(str(tmp_path), "float32")
