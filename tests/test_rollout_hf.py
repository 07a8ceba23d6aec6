"""The transformers rollout engine: shapes, seeding, EOS handling, log-probs, weight updates."""

from __future__ import annotations

import json

import pytest
import torch

from gad_megatron.rollout import RolloutEngine, make_engine
from gad_megatron.rollout.hf_engine import HFEngine
from tests.tiny_models import make_hf_model

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]  # different lengths: exercises left padding
EOS = 7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_hf_model("qwen3", tmp_path_factory.mktemp("hf") / "qwen3")


@pytest.fixture(scope="module")
def engine(model_dir):
    return HFEngine.from_pretrained(model_dir, eos_id=EOS, pad_id=0)


def test_protocol_and_factory(model_dir):
    e = make_engine("hf", model_dir, tp=1, eos_id=EOS, pad_id=0)
    assert isinstance(e, RolloutEngine)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert isinstance(make_engine("hf", cfg, tp=1, eos_id=EOS), HFEngine)
    with pytest.raises(ValueError, match="one device"):
        make_engine("hf", model_dir, tp=2, eos_id=EOS)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("trt", model_dir)
    with pytest.raises(ValueError, match="directory"):
        make_engine("vllm", cfg)


def test_shapes_and_seeded_determinism(engine):
    n, new = 3, 6
    g = engine.generate(PROMPTS, n=n, temperature=0.9, top_p=0.95, max_new_tokens=new, seed=11)
    assert len(g.responses) == len(g.logprobs) == len(g.finished) == len(PROMPTS) * n
    assert g.group_index == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for resp, lp, fin in zip(g.responses, g.logprobs, g.finished):
        assert 1 <= len(resp) <= new and len(lp) == len(resp)
        assert fin == (resp[-1] == EOS) and EOS not in resp[:-1]
        assert all(x <= 0 for x in lp)
    again = engine.generate(PROMPTS, n=n, temperature=0.9, top_p=0.95, max_new_tokens=new,
                            seed=11)
    assert again.responses == g.responses and again.logprobs == g.logprobs
    other = engine.generate(PROMPTS, n=n, temperature=0.9, top_p=0.95, max_new_tokens=new,
                            seed=12)
    assert other.responses != g.responses


def test_eos_stripping(model_dir):
    free = HFEngine.from_pretrained(model_dir, eos_id=10_000, pad_id=0)  # never sampled
    base = free.generate([PROMPTS[0]], n=1, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)
    tokens = base.responses[0]
    assert len(tokens) == 8 and base.finished == [False]
    stop = tokens[3]
    first = tokens.index(stop)
    stopping = HFEngine.from_pretrained(model_dir, eos_id=stop, pad_id=0)
    # A batch with a longer-running neighbour: the stopped row gets padded after its EOS.
    g = stopping.generate([PROMPTS[0], PROMPTS[1]], n=1, temperature=0.0, top_p=1.0,
                          max_new_tokens=8, seed=0)
    assert g.responses[0] == tokens[:first + 1]
    assert g.finished[0] and len(g.logprobs[0]) == first + 1
    assert g.logprobs[0] == pytest.approx(base.logprobs[0][:first + 1], abs=1e-5)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.8), (1.3, 1.0)])
def test_logprobs_match_forward_recompute(model_dir, engine, temperature, top_p):
    import transformers as tf

    g = engine.generate(PROMPTS, n=2, temperature=temperature, top_p=top_p, max_new_tokens=5,
                        seed=3)
    ref = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for k, (resp, lps) in enumerate(zip(g.responses, g.logprobs)):
        prompt = PROMPTS[g.group_index[k]]
        seq = torch.tensor([prompt + resp])
        with torch.no_grad():
            logits = ref(input_ids=seq).logits[0, len(prompt) - 1:-1]
        want = torch.log_softmax(logits / temperature, -1).gather(
            -1, torch.tensor(resp)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(lps), want, atol=1e-5, rtol=0), (k, lps, want)


def test_update_weights_bitwise_and_refusals(model_dir):
    e = HFEngine.from_pretrained(model_dir, eos_id=EOS, pad_id=0)
    before = {k: v.clone() for k, v in e.state_dict().items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    new = torch.randn_like(before[name])
    e.update_weights([(name, new)])
    assert torch.equal(e.state_dict()[name], new)
    with pytest.raises(KeyError, match="unknown parameter 'model.nope.weight'"):
        e.update_weights([("model.norm.weight", torch.zeros_like(before["model.norm.weight"])),
                          ("model.nope.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="has shape"):
        e.update_weights([("model.norm.weight", torch.zeros(3))])
    # A refused batch changes nothing, not even its valid entries.
    assert torch.equal(e.state_dict()["model.norm.weight"], before["model.norm.weight"])


def test_tied_embedding_update_covers_lm_head(tmp_path):
    d = make_hf_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    e = HFEngine.from_pretrained(d, eos_id=EOS, pad_id=0)
    emb = torch.randn_like(e.state_dict()["model.embed_tokens.weight"])
    e.update_weights([("model.embed_tokens.weight", emb)])
    assert torch.equal(e.model.get_output_embeddings().weight, emb)


def test_sleep_wake_noop_on_cpu(engine):
    engine.sleep()
    engine.wake()
    g = engine.generate([[1, 2]], n=1, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=0)
    assert len(g.responses) == 1


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rotary_buffers_recomputed(tmp_path, family):
    # megatron_patches leave transformers' rotary buffers uninitialised (they are not in the
    # checkpoint); the engine recomputes them, so a zeroed buffer must come back exact.
    from gad_megatron.rollout.hf_engine import _reset_rotary_buffers

    d = make_hf_model(family, tmp_path / family)
    e = HFEngine.from_pretrained(d, eos_id=EOS, pad_id=0)
    rope = e.model.model.rotary_emb
    want = rope.inv_freq.clone()
    rope.inv_freq.zero_()
    rope.original_inv_freq.zero_()
    _reset_rotary_buffers(e.model)
    assert torch.equal(rope.inv_freq, want) and torch.equal(rope.original_inv_freq, want)


def test_a_tied_model_asks_a_sync_for_its_embedding_once(tmp_path):
    """The trainer's export leaves a tied LM head out; the engine must not ask for it."""
    from gad_megatron.rollout.hf_engine import HFEngine
    from tests.tiny_models import make_hf_model

    tied = HFEngine.from_pretrained(make_hf_model("qwen2", tmp_path / "t", tie_word_embeddings=True),
                                    eos_id=2, pad_id=0)
    manifest = tied.weight_manifest()
    assert "lm_head.weight" not in manifest and "model.embed_tokens.weight" in manifest
    assert "lm_head.weight" in tied.state_dict()  # still readable under both names
