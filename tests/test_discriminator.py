"""The discriminator: padding-invariant scores, TP=2 == TP=1, a BT step moves scores apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.dist_utils import run_parallel
from tests.tiny_models import make_hf_model

SEQS = [[5, 17, 3, 9, 42, 8], [11, 2, 64], [7, 7, 30, 1, 99, 4, 56, 23]]


def padded(seqs, side: str, width: int):
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        tokens[i, sl], valid[i, sl] = torch.tensor(s), True
    return tokens, valid


def build(model_dir, head_seed=None):
    from megatron.core import parallel_state as ps

    from gad_megatron.models.discriminator import build_discriminator, load_student_weights
    from gad_megatron.models.hf_config import read_hf_config

    arch = read_hf_config(model_dir)
    model = build_discriminator(arch, ps.get_tensor_model_parallel_world_size(),
                                ps.get_pipeline_model_parallel_world_size(), head_init_std=0.02)
    load_student_weights(model, arch, model_dir)
    if head_seed is not None and model.post_process:  # identical head across layouts
        g = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            model.output_layer.weight.copy_(torch.randn(1, 32, generator=g) * 0.1)
    return arch, model


def scores(model, tokens, valid):
    from gad_megatron.models.discriminator import score_micro_batches, to_right_padding
    from gad_megatron.models.forward import MicroBatch

    tokens, valid = to_right_padding(tokens, valid)
    outs = score_micro_batches(model, [MicroBatch(tokens, valid, {})])
    return outs[0] if outs else None


def padding_rank(rank, model_dir):
    _, model = build(model_dir)
    model.eval()
    with torch.no_grad():
        alone = torch.cat([scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool))
                           for s in SEQS])
        right = scores(model, *padded(SEQS, "right", 10))
        left = scores(model, *padded(SEQS, "left", 10))
    return alone, right, left


def test_scores_do_not_depend_on_padding(tmp_path):
    model_dir = make_hf_model("qwen3", tmp_path / "m")
    ((alone, right, left),) = run_parallel(padding_rank, args=(model_dir,))
    assert alone.abs().max() > 0  # a real, non-trivial score
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


def layout_rank(rank, model_dir):
    _, model = build(model_dir, head_seed=7)
    with torch.no_grad():
        return scores(model, *padded(SEQS, "right", 10))


def test_scores_at_tp2_equal_tp1(tmp_path):
    model_dir = make_hf_model("llama", tmp_path / "m")
    (ref,) = run_parallel(layout_rank, args=(model_dir,))
    tp2 = run_parallel(layout_rank, tp=2, args=(model_dir,))
    pp2 = run_parallel(layout_rank, pp=2, args=(model_dir,))
    for got in tp2 + [r for r in pp2 if r is not None]:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def bt_step_rank(rank, model_dir):
    from gad_megatron.checkpoint.hf_io import HFTensorIndex

    arch, model = build(model_dir)
    index = HFTensorIndex(model_dir)
    backbone_ok = torch.equal(model.decoder.layers[1].mlp.linear_fc2.weight,
                              index.get("model.layers.1.mlp.down_proj.weight"))
    head_std = model.output_layer.weight.std().item()
    teacher, t_valid = padded([SEQS[0]], "right", 8)
    student, s_valid = padded([SEQS[2]], "right", 8)
    before = (scores(model, teacher, t_valid) - scores(model, student, s_valid)).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = -F.logsigmoid(scores(model, teacher, t_valid) - scores(model, student, s_valid)).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = (scores(model, teacher, t_valid) - scores(model, student, s_valid)).item()
    return backbone_ok, head_std, before, after


def test_one_bradley_terry_step_widens_the_teacher_margin(tmp_path):
    model_dir = make_hf_model("qwen2", tmp_path / "m")
    ((backbone_ok, head_std, before, after),) = run_parallel(bt_step_rank, args=(model_dir,))
    assert backbone_ok, "backbone must start from the student's weights"
    assert 0 < head_std < 0.05, "the head starts fresh and small"
    assert after > before + 1e-4, (before, after)
