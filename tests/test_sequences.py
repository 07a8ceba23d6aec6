"""Micro-batching of sequences and the DP split: positions worked out by hand."""

from __future__ import annotations

import torch

from gad_megatron.config.schema import ParallelConfig
from gad_megatron.trainer.roles import rank_coords, split_groups
from gad_megatron.workers.sequences import Sequences, budget_chunks, micro_batches, per_sequence


def test_response_positions_predict_response_tokens():
    # prompt [5, 6, 7], response [8, 9]: tokens 5 6 7 8 9; position 2 (token 7) predicts 8,
    # position 3 predicts 9, so resp_mask is True at positions 2 and 3 only.
    seqs = Sequences([[5, 6, 7], [1]], [[8, 9], [2, 3, 4]])
    (mb,) = micro_batches(seqs, token_budget=100, pad_id=0)
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert mb.extra["resp_mask"].tolist() == [[False, False, True, True, False],
                                              [True, True, True, False, False]]
    assert mb.extra["targets"][0][mb.extra["resp_mask"][0]].tolist() == [8, 9]
    assert mb.extra["targets"][1][mb.extra["resp_mask"][1]].tolist() == [2, 3, 4]
    values = torch.arange(10.0).reshape(2, 5)
    assert [a.tolist() for a in per_sequence(values, mb)] == [[2.0, 3.0], [5.0, 6.0, 7.0]]


def test_token_budget_chunks_and_groups():
    # lengths 4,4,4,8: budget 8 fits two rows of 4; the row of 8 goes alone.
    assert budget_chunks([4, 4, 4, 8], 8) == [[0, 1], [2], [3]]
    # groups 0,0,1,1 are never split, even when a group alone exceeds the budget.
    assert budget_chunks([4, 4, 4, 4], 8, groups=[0, 0, 1, 1]) == [[0, 1], [2, 3]]
    assert budget_chunks([4, 4, 4, 4], 4, groups=[0, 0, 1, 1]) == [[0, 1], [2, 3]]


def test_micro_batches_are_padded_only_to_their_own_longest_row():
    # Issue 14, defect 11: at PP>1 they used to be padded to the most rows of any chunk times
    # the longest sequence of the whole batch (here every one to [2, 4]).
    seqs = Sequences([[1], [1], [1]], [[2, 3], [2], [2, 3, 4]])
    mbs = micro_batches(seqs, token_budget=6, pad_id=0)
    assert [tuple(mb.tokens.shape) for mb in mbs] == [(2, 3), (1, 4)]
    assert [mb.extra["index"] for mb in mbs] == [[0, 1], [2]]


def test_dp_split_keeps_groups_and_balances_tokens():
    seqs = Sequences([[1]] * 6, [[2]] * 6, group=[0, 0, 1, 1, 2, 2])
    assert split_groups(seqs, 2) == [[0, 1, 2, 3], [4, 5]]
    assert split_groups(seqs, 3) == [[0, 1], [2, 3], [4, 5]]
    assert split_groups(seqs, 1) == [[0, 1, 2, 3, 4, 5]]


def test_rank_coordinates_follow_megatron_order():
    # tp fastest, then dp, then pp: rank = tp + TP * (dp + DP * pp)
    par = ParallelConfig(tp=2, pp=2, dp=2)
    assert [rank_coords(r, par) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
