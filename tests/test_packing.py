"""Sequence packing (issue 11, item 1): packed micro-batches give the padded layout's results.

Packed = sequences end to end in one row with THD `PackedSeqParams`; padded = one
right-padded row per sequence. In fp32 the log-probs, the discriminator's scores and every
parameter gradient agree within 1e-5, at TP=1 and TP=2 and through a PP=2 schedule, and the
packed log-probs match transformers' own forward of each sequence alone.
"""

from __future__ import annotations

import torch

from tests.dist_utils import run_parallel
from tests.tiny_models import hf_logits, make_hf_model

# Varied prompt and response lengths (1-token prompts and responses included).
PROMPTS = [[5, 17, 3], [11], [7, 7, 30, 1, 99], [2, 4], [60, 61, 62, 63, 64, 65]]
RESPONSES = [[9, 42, 8, 1], [2, 64], [4], [13, 14, 15, 16, 17, 18, 19], [70, 71, 72]]
TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """|a - b| <= 1e-5, relative to a's scale where that exceeds 1 (fp32 sums of gradients
    of size ~30 round at ~1e-6 relative)."""
    return float((a - b).abs().max()) <= TOL * max(1.0, float(a.abs().max()))


def _seqs():
    from gad_megatron.workers.sequences import Sequences

    return Sequences(PROMPTS, RESPONSES, group=[0, 0, 1, 1, 2])


# ---- layout, worked out by hand ------------------------------------------------------------

def test_packed_attention_is_block_diagonal_causal_attention(tmp_path):
    """The CPU core attention on a packed row equals one masked product with the
    block-diagonal causal mask (written out by hand), and sees nothing across sequences."""
    outs = run_parallel(_attention_rank)[0]
    dense, blockwise, changed = outs
    assert torch.allclose(dense, blockwise, atol=1e-6, rtol=0)
    assert changed[:2] == [False, False] and changed[2]  # only the third sequence saw it


def _attention_rank(rank):
    from megatron.core.packed_seq_params import PackedSeqParams

    from gad_megatron.models.builder import transformer_config
    from gad_megatron.models.hf_config import parse_hf_config
    from gad_megatron.models.packed_attention import PackedDotProductAttention
    from gad_megatron.models.builder import BuildOptions
    from megatron.core.transformer.enums import AttnMaskType

    arch = parse_hf_config({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                            "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
                            "num_hidden_layers": 1, "num_attention_heads": 2,
                            "num_key_value_heads": 2, "hidden_act": "silu",
                            "max_position_embeddings": 16, "rms_norm_eps": 1e-6,
                            "rope_theta": 10000.0, "torch_dtype": "float32"})
    config = transformer_config(arch, 1, 1, BuildOptions())
    attn = PackedDotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                     attention_type="self")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, 4, generator=g) for _ in range(3))  # [T=5, heads, dim]
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=3, max_seqlen_kv=3)
    blockwise = attn(q, k, v, None, packed_seq_params=params)
    visible = torch.tensor([[1, 0, 0, 0, 0],
                            [1, 1, 0, 0, 0],
                            [0, 0, 1, 0, 0],
                            [0, 0, 1, 1, 0],
                            [0, 0, 1, 1, 1]], dtype=torch.bool)
    dense = attn(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), ~visible[None, None])
    v2 = v.clone()
    v2[4] += 1.0  # the last token of the second sequence
    other = attn(q, k, v2, None, packed_seq_params=params)
    changed = [bool((other[i] != blockwise[i]).any()) for i in (0, 1, 4)]
    return dense, blockwise, changed


def test_packed_micro_batch_by_hand():
    from gad_megatron.workers.sequences import Sequences, to_packed_micro_batch

    seqs = Sequences([[5, 6], [7]], [[8], [9, 10]])
    mb = to_packed_micro_batch(seqs, [0, 1], pad_id=0, align=4)
    # [5 6 8 | 7 9 10 | pad pad]: 6 real tokens, aligned to 8 by a trailing pad segment.
    assert mb.tokens.tolist() == [[5, 6, 8, 7, 9, 10, 0, 0]]
    assert mb.extra["targets"].tolist() == [[6, 8, 0, 9, 10, 0, 0, 0]]
    assert mb.packing.cu_seqlens.tolist() == [0, 3, 6, 8] and mb.packing.max_seqlen == 3
    assert mb.packing.gather.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert mb.valid.tolist() == [[True] * 3, [True] * 3]
    # resp_mask marks positions whose next token is a response token (row layout).
    assert mb.extra["resp_mask"].tolist() == [[False, True, False], [True, True, False]]
    rows = mb.rows(torch.arange(8.0)[None])
    assert rows.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_packed_budget_counts_real_tokens():
    from gad_megatron.workers.sequences import budget_chunks

    # Padded, [2, 8] costs 2 * 8 = 16 > 10; packed, 2 + 8 = 10 fits.
    assert budget_chunks([2, 8, 4], 10) == [[0], [1], [2]]
    assert budget_chunks([2, 8, 4], 10, packed=True) == [[0, 1], [2]]
    assert budget_chunks([2, 8, 4, 4], 10, groups=[0, 0, 1, 1], packed=True) == [[0, 1], [2, 3]]


# ---- numerics ------------------------------------------------------------------------------

def _logp_and_grads(model, arch, mbs):
    """Row-layout response log-probs per sequence, and the parameter gradients of their sum."""
    from gad_megatron.models.forward import model_inputs
    from gad_megatron.models.logprobs import micro_batch_logprobs
    from gad_megatron.workers.sequences import per_sequence

    model.zero_grad()
    out = []
    for mb in mbs:
        logits = model(**model_inputs(mb))
        logp = micro_batch_logprobs(logits, mb, arch.vocab_size)
        mask = mb.extra["resp_mask"]
        torch.where(mask, logp, torch.zeros_like(logp)).sum().backward()
        out += per_sequence(logp, mb)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def policy_rank(rank, model_dir):
    from megatron.core import parallel_state as ps

    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.models.builder import build_gpt
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.workers.sequences import micro_batches

    arch = read_hf_config(model_dir)
    model = build_gpt(arch, ps.get_tensor_model_parallel_world_size(), 1)
    load_hf_weights(model, arch, model_dir)
    seqs = _seqs()
    padded = _logp_and_grads(model, arch, micro_batches(seqs, 64, pad_id=0))
    # Budget 12: several packed micro-batches, each with several sequences.
    packed_mbs = micro_batches(seqs, 12, pad_id=0, packed=True)
    assert len(packed_mbs) > 1 and all(mb.tokens.shape[0] == 1 for mb in packed_mbs)
    return padded, _logp_and_grads(model, arch, packed_mbs)


def _hf_response_logprobs(model_dir):
    out = []
    for p, r in zip(PROMPTS, RESPONSES):
        ids = torch.tensor([p + r])
        logp = torch.log_softmax(hf_logits(model_dir, ids).double(), dim=-1)[0]
        out.append(logp[len(p) - 1: -1].gather(-1, torch.tensor(r)[:, None]).squeeze(-1))
    return out


def _check_policy(model_dir, tp):
    ref = _hf_response_logprobs(model_dir)
    for (pad_logp, pad_grads), (pack_logp, pack_grads) in run_parallel(
            policy_rank, tp=tp, args=(model_dir,)):
        for a, b, h in zip(pad_logp, pack_logp, ref):
            assert abs(a - b).max() <= TOL
            assert abs(torch.from_numpy(b).double() - h).max() <= TOL  # transformers' forward
        assert pad_grads.keys() == pack_grads.keys() and len(pad_grads) > 5
        for name, g in pad_grads.items():
            assert close(g, pack_grads[name]), name


def test_packed_logprobs_and_gradients_equal_padded_llama3_rope(tmp_path):
    _check_policy(make_hf_model("llama", tmp_path / "m"), tp=1)


def test_packed_logprobs_and_gradients_equal_padded_at_tp2(tmp_path):
    _check_policy(make_hf_model("qwen3", tmp_path / "m"), tp=2)


def discriminator_rank(rank, model_dir):
    from megatron.core import parallel_state as ps

    from gad_megatron.models.discriminator import build_discriminator, load_student_weights
    from gad_megatron.models.forward import model_inputs
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.models.discriminator import micro_batch_scores
    from gad_megatron.workers.sequences import micro_batches

    arch = read_hf_config(model_dir)
    model = build_discriminator(arch, ps.get_tensor_model_parallel_world_size(), 1,
                                head_init_std=0.5)
    load_student_weights(model, arch, model_dir)
    results = []
    for packed, budget in ((False, 64), (True, 12)):
        model.zero_grad()
        scores = []
        for mb in micro_batches(_seqs(), budget, pad_id=0, packed=packed):
            rows = micro_batch_scores(model(**model_inputs(mb)), mb)
            # Sequence i weighs i + 1: the same total loss in both layouts, any chunking.
            weight = torch.tensor([i + 1.0 for i in mb.extra["index"]])
            (rows * weight).sum().backward()
            scores.append(rows.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((torch.cat(scores), grads))
    return results


def test_packed_discriminator_scores_and_gradients_equal_padded(tmp_path):
    model_dir = make_hf_model("qwen2", tmp_path / "m")
    (pad, pad_g), (pack, pack_g) = run_parallel(discriminator_rank, args=(model_dir,))[0]
    assert pad.shape == (5,) and close(pad, pack)
    assert pad_g.keys() == pack_g.keys() and "output_layer.weight" in pad_g
    for name, g in pad_g.items():
        assert close(g, pack_g[name]), name


def schedule_rank(rank, model_dir, packed):
    """Forward-only log-probs through Megatron's PP=2 schedule (variable_seq_lengths)."""
    from megatron.core import parallel_state as ps

    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.models.builder import build_gpt
    from gad_megatron.models.forward import run_schedule
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.models.logprobs import micro_batch_logprobs
    from gad_megatron.workers.sequences import micro_batches, per_sequence

    arch = read_hf_config(model_dir)
    model = build_gpt(arch, 1, ps.get_pipeline_model_parallel_world_size())
    load_hf_weights(model, arch, model_dir)
    model.eval()
    mbs = micro_batches(_seqs(), 12 if packed else 64, pad_id=0, packed=packed)
    with torch.no_grad():
        outs = run_schedule(model, mbs, lambda o, mb: per_sequence(
            micro_batch_logprobs(o, mb, arch.vocab_size), mb))
    return [a for chunk in outs for a in chunk] if ps.is_pipeline_last_stage() else None


def test_packed_equals_padded_through_a_pp2_schedule(tmp_path):
    model_dir = make_hf_model("qwen2", tmp_path / "m")
    padded = run_parallel(schedule_rank, pp=2, args=(model_dir, False))[1]
    packed = run_parallel(schedule_rank, pp=2, args=(model_dir, True))[1]
    assert len(padded) == len(packed) == 5
    for a, b in zip(padded, packed):
        assert a.shape == b.shape and abs(a - b).max() <= TOL
