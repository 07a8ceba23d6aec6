"""The weight-sync plan on a model small enough to check by hand.

Llama, fp32, vocab 10, hidden 4, 2 heads (2 KV heads, head_dim 2), intermediate 8, 2 layers,
untied. Bytes per HF tensor (4 bytes per element):
  embed_tokens 10x4 = 160 | per layer: input_layernorm 16, q/k/v/o 4x4 = 64 each,
  post_attention_layernorm 16, gate/up 8x4 = 128 each, down 4x8 = 128  (672 per layer)
  | norm 16 | lm_head 160.  Total 160 + 2 * 672 + 16 + 160 = 1680.
"""

from __future__ import annotations

import pytest
import torch

from gad_megatron.models.hf_config import parse_hf_config
from gad_megatron.resharding.plan import (assign_buckets, engine_slice, param_metas,
                                          plan_sync)

LAYER = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
         "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
         "mlp.down_proj"]
LAYER_BYTES = [16, 64, 64, 64, 64, 16, 128, 128, 128]


def tiny_arch(**overrides):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 4,
           "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "tie_word_embeddings": False, **overrides}
    return parse_hf_config(cfg)


def names_in_order():
    out = ["model.embed_tokens.weight"]
    for layer in range(2):
        out += [f"model.layers.{layer}.{m}.weight" for m in LAYER]
    return out + ["model.norm.weight", "lm_head.weight"]


def sizes_in_order():
    return [160] + LAYER_BYTES * 2 + [16, 160]


def test_param_metas_stage_ownership():
    metas = param_metas(tiny_arch(), pp=2)
    stage = {m.megatron: m.stage for m in metas}
    assert stage["embedding.word_embeddings.weight"] == 0
    assert stage["decoder.layers.0.self_attention.linear_qkv.weight"] == 0
    assert stage["decoder.layers.1.self_attention.linear_qkv.weight"] == 1
    assert stage["decoder.final_layernorm.weight"] == 1
    assert stage["output_layer.weight"] == 1
    qkv = next(m for m in metas if m.megatron.endswith("0.self_attention.linear_qkv.weight"))
    assert qkv.hf_shapes == ((4, 4), (4, 4), (4, 4)) and qkv.split == "qkv"
    assert sum(m.nbytes() for m in metas) == 1680
    assert [m.stage for m in metas] == sorted(m.stage for m in metas)  # stage order


def test_tied_output_exported_once():
    metas = param_metas(tiny_arch(tie_word_embeddings=True), pp=2)
    names = [n for m in metas for n in m.hf_names]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    assert sum(m.nbytes() for m in metas) == 1680 - 160


def test_family_specific_tensors():
    qwen2 = param_metas(parse_hf_config({**tiny_arch().raw,
                                         "architectures": ["Qwen2ForCausalLM"]}), pp=1)
    assert "model.layers.1.self_attn.k_proj.bias" in {n for m in qwen2 for n in m.hf_names}
    qwen3 = param_metas(parse_hf_config({**tiny_arch().raw,
                                         "architectures": ["Qwen3ForCausalLM"]}), pp=1)
    assert "model.layers.0.self_attn.q_norm.weight" in {n for m in qwen3 for n in m.hf_names}


# (tp, pp, engine_tp) -> expected (merge rule of q_proj, of o_proj, of embed; stage of layer 1;
# stage of lm_head; receivers)
LAYOUTS = {
    (1, 1, 1): ("none", "none", "none", 0, 0, (0,)),
    (2, 1, 1): ("qkv", "row", "vocab", 0, 0, (0,)),
    (1, 2, 1): ("none", "none", "none", 1, 1, (0,)),
    (2, 2, 2): ("qkv", "row", "vocab", 1, 1, (0, 1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plan_layouts(layout):
    tp, pp, etp = layout
    plan = plan_sync(tp, pp, etp, param_metas(tiny_arch(), pp), bucket_bytes=1 << 20)
    assert [op.hf_name for op in plan.ops] == names_in_order()
    assert [op.nbytes for op in plan.ops] == sizes_in_order()
    ops = {op.hf_name: op for op in plan.ops}
    q_merge, o_merge, e_merge, l1_stage, head_stage, receivers = LAYOUTS[layout]
    assert ops["model.layers.0.self_attn.q_proj.weight"].tp_merge == q_merge
    assert ops["model.layers.0.self_attn.o_proj.weight"].tp_merge == o_merge
    assert ops["model.embed_tokens.weight"].tp_merge == e_merge
    assert ops["model.layers.0.self_attn.q_proj.weight"].src_stage == 0
    assert ops["model.layers.1.mlp.down_proj.weight"].src_stage == l1_stage
    assert ops["lm_head.weight"].src_stage == head_stage
    assert all(op.receivers == receivers for op in plan.ops)
    assert plan.sender == (0, 0, 0)
    # One bucket holds everything when it is large enough.
    assert plan.bucket_sizes() == [1680] and plan.peak_bytes == plan.total_bytes == 1680
    assert len(plan.for_engine_rank(etp - 1)) == len(plan.ops)


def test_bucket_boundaries_by_hand():
    plan = plan_sync(1, 1, 1, param_metas(tiny_arch(), 1), bucket_bytes=200)
    # embed+ln0 | q k v | o post_ln | gate | up | down+ln1 | q k v | o post | gate | up
    # | down+norm | lm_head
    assert plan.bucket_sizes() == [176, 192, 80, 128, 128, 144, 192, 80, 128, 128, 144, 160]
    assert plan.peak_bytes == 192


def test_oversized_tensor_gets_its_own_bucket():
    plan = plan_sync(1, 1, 1, param_metas(tiny_arch(), 1), bucket_bytes=100)
    for bucket in plan.buckets():
        if sum(op.nbytes for op in bucket) > 100:
            assert len(bucket) == 1
    assert plan.buckets()[0][0].hf_name == "model.embed_tokens.weight"
    assert len(plan.buckets()[0]) == 1
    assert plan.buckets()[1][0].hf_name.endswith("input_layernorm.weight")
    assert plan.peak_bytes == 160  # the embedding (and lm_head) alone


@pytest.mark.parametrize("bucket_bytes", [1, 16, 50, 64, 100, 128, 200, 333, 1000, 1680, 5000])
def test_bucket_invariants(bucket_bytes):
    sizes = sizes_in_order()
    buckets = assign_buckets(sizes, bucket_bytes)
    assert buckets[0] == 0 and all(b - a in (0, 1) for a, b in zip(buckets, buckets[1:]))
    plan = plan_sync(2, 2, 2, param_metas(tiny_arch(), 2), bucket_bytes)
    for bucket in plan.buckets():
        total = sum(op.nbytes for op in bucket)
        assert total <= bucket_bytes or len(bucket) == 1
    assert plan.peak_bytes == max(plan.bucket_sizes())
    assert plan.peak_bytes <= max(bucket_bytes, max(sizes))
    assert sum(plan.bucket_sizes()) == 1680


def test_engine_slices_tp2():
    arch = tiny_arch()
    plan = plan_sync(2, 2, 2, param_metas(arch, 2), bucket_bytes=1 << 20)
    ops = {op.hf_name: op for op in plan.ops}
    want = {  # name -> (rank 0 slice, rank 1 slice)
        "model.layers.0.self_attn.q_proj.weight": ((0, 0, 2), (0, 2, 4)),
        "model.layers.0.self_attn.k_proj.weight": ((0, 0, 2), (0, 2, 4)),
        "model.layers.0.self_attn.o_proj.weight": ((1, 0, 2), (1, 2, 4)),
        "model.layers.0.mlp.gate_proj.weight": ((0, 0, 4), (0, 4, 8)),
        "model.layers.0.mlp.down_proj.weight": ((1, 0, 4), (1, 4, 8)),
        "model.embed_tokens.weight": ((0, 0, 5), (0, 5, 10)),
        "model.norm.weight": (None, None),
    }
    for name, slices in want.items():
        assert tuple(engine_slice(ops[name], r, 2, arch) for r in range(2)) == slices, name


def test_engine_slices_replicate_kv_heads():
    arch = tiny_arch(num_key_value_heads=1)  # 1 KV head of width 2, engine tp 2: both keep it
    plan = plan_sync(1, 1, 2, param_metas(arch, 1), bucket_bytes=1 << 20)
    k = next(op for op in plan.ops if op.hf_name.endswith("0.self_attn.k_proj.weight"))
    assert k.shape == (2, 4)
    assert [engine_slice(k, r, 2, arch) for r in range(2)] == [(0, 0, 2), (0, 0, 2)]


def test_refusals():
    with pytest.raises(ValueError, match="divide"):
        param_metas(tiny_arch(), pp=3)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_sync(1, 1, 1, param_metas(tiny_arch(), 1), bucket_bytes=0)
    with pytest.raises(ValueError, match="stage"):
        plan_sync(1, 1, 1, param_metas(tiny_arch(), 2), bucket_bytes=10)
    assert param_metas(tiny_arch(), 1, dtype=torch.bfloat16)[0].nbytes() == 80
