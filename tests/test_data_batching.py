"""Group-aware batches: padding, packing (cu_seqlens), seeded order, exact resume, DP slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gad_megatron.data import (
    DataConfig, DataError, GroupLoader, TokenDataset, build_builtin_tokenizer, build_dataset,
    pack_sequences, pad_sequences,
)
from gad_megatron.data.task import write_task


def toy_dataset(n: int = 23) -> TokenDataset:
    # Row i: prompt [100+i] * (1 + i % 3), answer [200+i] * (1 + i % 4); distinct per row.
    prompts = [np.full(1 + i % 3, 100 + i, np.int32) for i in range(n)]
    answers = [np.full(1 + i % 4, 200 + i, np.int32) for i in range(n)]
    from gad_megatron.data.dataset import _flatten

    return TokenDataset([f"k{i}" for i in range(n)], *_flatten(prompts), *_flatten(answers))


def order_of(batches):
    return [[g.example.index for g in b.groups] for b in batches]


def test_pad_right_and_left():
    p, r = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    right = pad_sequences(p, r, pad_id=0, side="right")
    assert right.tokens.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert right.attention_mask.tolist() == [[True] * 5, [True] * 4 + [False]]
    assert right.response_mask.int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert right.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0]]
    left = pad_sequences(p, r, pad_id=0, side="left", pad_to_multiple=4)
    assert left.tokens.tolist() == [[0, 0, 0, 1, 2, 3, 5, 6], [0, 0, 0, 0, 4, 7, 8, 9]]
    assert left.response_mask.int().tolist() == [[0] * 6 + [1, 1], [0] * 5 + [1, 1, 1]]
    assert left.prompt_lengths.tolist() == [3, 1] and left.response_lengths.tolist() == [2, 3]
    assert left.tokens.dtype == torch.long and left.group_index.tolist() == [0, 1]


def test_pack_matches_unpadded_concatenation():
    p, r = [[1, 2, 3], [4], [5, 5]], [[6, 7], [8, 9, 9], [1]]
    pk = pack_sequences(p, r, pad_id=0, group_index=[0, 0, 1])
    assert pk.tokens.shape == (1, 12)
    assert pk.tokens[0].tolist() == [1, 2, 3, 6, 7, 4, 8, 9, 9, 5, 5, 1]
    assert pk.cu_seqlens.dtype == torch.int32 and pk.cu_seqlens.tolist() == [0, 5, 9, 12]
    assert pk.cu_seqlens_padded.tolist() == [0, 5, 9, 12] and pk.max_seqlen == 5
    assert pk.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    assert pk.response_mask[0].int().tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1]
    assert pk.group_index.tolist() == [0, 0, 1]
    # Same content as the padded batch with padding removed.
    padded = pad_sequences(p, r, pad_id=0)
    assert torch.equal(padded.tokens[padded.attention_mask], pk.tokens[0])
    assert torch.equal(padded.response_mask[padded.attention_mask], pk.response_mask[0])


def test_pack_align_pads_each_sequence():
    pk = pack_sequences([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0, align=4)
    assert pk.tokens[0].tolist() == [1, 2, 3, 5, 4, 6, 7, 0]
    assert pk.cu_seqlens.tolist() == [0, 4, 7] and pk.cu_seqlens_padded.tolist() == [0, 4, 8]
    assert pk.max_seqlen == 4


def test_loader_is_deterministic_and_covers_each_epoch():
    ds = toy_dataset(23)
    a = GroupLoader(ds, 5, seed=7)
    b = GroupLoader(ds, 5, seed=7)
    assert a.batches_per_epoch == 4  # drop_last: 3 rows left over each epoch
    ea = order_of(a.one_epoch())
    assert ea == order_of(b.one_epoch())
    flat = [i for batch in ea for i in batch]
    assert len(set(flat)) == 20 and flat != sorted(flat)
    assert order_of(a.one_epoch()) != ea  # a new permutation every epoch
    assert order_of(GroupLoader(ds, 5, seed=8).one_epoch()) != ea
    plain = GroupLoader(ds, 5, shuffle=False, drop_last=False)
    assert [len(x) for x in plain.one_epoch()] == [5, 5, 5, 5, 3]
    assert order_of(GroupLoader(ds, 5, shuffle=False).one_epoch())[0] == [0, 1, 2, 3, 4]


def test_resume_gives_the_same_batches():
    ds = toy_dataset(23)
    ref = GroupLoader(ds, 4, seed=3)
    expected = [next(iter(ref)) for _ in range(13)]  # crosses two epoch ends (5 per epoch)
    run = GroupLoader(ds, 4, seed=3)
    it = iter(run)
    for _ in range(7):
        next(it)
    state = run.state_dict()
    assert state["epoch"] == 1 and state["step_in_epoch"] == 2
    resumed = GroupLoader(ds, 4, seed=999)  # the seed comes from the state
    resumed.load_state_dict(dict(state))
    got = [resumed.next_batch() for _ in range(6)]
    assert order_of(got) == order_of(expected[7:])
    assert [(b.epoch, b.step_in_epoch) for b in got] == \
        [(e.epoch, e.step_in_epoch) for e in expected[7:]]
    with pytest.raises(DataError, match="num_rows"):
        GroupLoader(toy_dataset(22), 4).load_state_dict(state)


def test_dp_ranks_split_the_global_batch():
    ds = toy_dataset(23)
    full = order_of(GroupLoader(ds, 6, seed=1).one_epoch())
    parts = [order_of(GroupLoader(ds, 6, seed=1, dp_rank=r, dp_size=3).one_epoch()) for r in range(3)]
    for step, batch in enumerate(full):
        assert sum((p[step] for p in parts), []) == batch
    with pytest.raises(DataError, match="not divisible"):
        GroupLoader(ds, 6, dp_size=4)
    with pytest.raises(DataError, match="cannot fill one batch"):
        GroupLoader(toy_dataset(3), 6)


def test_batch_helpers_group_major_samples():
    ds = toy_dataset(10)
    batch = GroupLoader(ds, 3, shuffle=False).next_batch()
    assert batch.group_index == [0, 1, 2] and batch.keys == ["k0", "k1", "k2"]
    gen = batch.prompts(pad_id=0, n_samples=2)
    assert gen.tokens.tolist() == [[0, 0, 100], [0, 0, 100], [0, 101, 101], [0, 101, 101],
                                   [102, 102, 102], [102, 102, 102]]
    assert gen.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    samples = [[9], [9, 9], [8], [8, 8, 8], [7], [2]]
    st = batch.student(samples, pad_id=0)
    assert st.tokens.tolist()[3:5] == [[101, 101, 8, 8, 8], [102, 102, 102, 7, 0]]
    assert st.group_index.tolist() == gen.group_index.tolist()
    assert st.response_lengths.tolist() == [1, 2, 1, 3, 1, 1]
    sp = batch.student_packed(samples, pad_id=0)
    assert sp.cu_seqlens.tolist() == [0, 2, 5, 8, 13, 17, 21]
    te = batch.teacher(pad_id=0)
    assert te.tokens[2].tolist() == [102, 102, 102, 202, 202, 202]
    assert batch.teacher_packed(pad_id=0).cu_seqlens.tolist() == [0, 2, 6, 12]
    with pytest.raises(ValueError, match="group-major"):
        batch.student(samples[:5], pad_id=0)


def test_end_to_end_task_batches(tmp_path):
    train, _ = write_task(tmp_path, n_train=40, n_test=5, seed=1)
    tok = build_builtin_tokenizer()
    cfg = DataConfig(prompts_per_batch=4, seed=5)
    ds = build_dataset([str(train)], cfg, tok)
    batch = GroupLoader.from_config(ds, cfg).next_batch()
    te = batch.teacher(pad_id=tok.pad_token_id)
    row = te.tokens[0][te.attention_mask[0]].tolist()
    text = tok.decode(row)
    assert text.startswith("<bos><|user|>") and text.endswith("<eos>")
    answer = tok.decode(te.tokens[0][te.response_mask[0]].tolist())
    assert "<|assistant|>" + answer in text and answer.endswith("<eos>")
    ev = GroupLoader.from_config(ds, cfg, train=False)
    assert sum(len(b) for b in ev.one_epoch()) == 40
