"""Sequences as the workers receive them, and their packing into Megatron micro-batches.

A `Sequences` is what crosses process boundaries (token ids and per-token values as numpy
arrays, whose buffers Ray passes without pickling each number). Workers turn it into
`MicroBatch`es under a token budget: packed (the default, `perf.packing`: sequences end to
end, no padding token enters the model) or right-padded. Sequence i is
`prompt_i + response_i`; the model at position t predicts token t+1, so response token k of
a sequence is scored at position `len(prompt) - 1 + k` of its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gad_megatron.models.forward import MicroBatch, Packing


def as_token_ids(tokens) -> np.ndarray:
    """Token ids as the 1-D int32 array a Sequences holds (no copy when already one)."""
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.int32 and tokens.ndim == 1:
        return tokens
    return np.asarray(tokens, dtype=np.int32).reshape(-1)


@dataclass
class Sequences:
    """N (prompt, response) token sequences plus per-sequence fields. Token ids are int32
    arrays (lists are converted on construction): a shard then crosses to a Ray worker as
    buffers, not as millions of pickled Python ints."""

    prompts: list[np.ndarray]
    responses: list[np.ndarray]
    group: list[int] = field(default_factory=list)
    """Prompt-group id of each sequence (GRPO groups, BT pairing, DP splits keep groups)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Per-sequence extras: a numpy array of one value per sequence (e.g. 'advantage'), or a
    list with one entry per sequence (e.g. 'old_logprobs': a float32 array per response).
    Arrays, not Python lists of floats: Ray passes their buffers without pickling each
    number (bench: `movement`)."""

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses):
            raise ValueError("prompts and responses differ in length")
        self.prompts = [as_token_ids(p) for p in self.prompts]
        self.responses = [as_token_ids(r) for r in self.responses]
        if not self.group:
            self.group = list(range(len(self.prompts)))
        for name, values in self.fields.items():
            if len(values) != len(self.prompts):
                raise ValueError(f"field {name!r} has {len(values)} values for "
                                 f"{len(self.prompts)} sequences")

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index: list[int]) -> "Sequences":
        return Sequences([self.prompts[i] for i in index], [self.responses[i] for i in index],
                         [self.group[i] for i in index],
                         {k: v[np.asarray(index, dtype=np.int64)] if isinstance(v, np.ndarray)
                          else [v[i] for i in index] for k, v in self.fields.items()})

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]

    def response_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


def prompt_minibatches(seqs: Sequences, prompts: int | None) -> list[Sequences]:
    """`seqs` split into mini-batches of `prompts` prompt groups each, every sequence of a
    group in the same one, groups in order of first appearance; None: one, all of `seqs`."""
    order: dict[int, list[int]] = {}
    for i, g in enumerate(seqs.group):
        order.setdefault(g, []).append(i)
    groups = list(order.values())
    if prompts is None or prompts >= len(groups):
        return [seqs]
    return [seqs.take([i for grp in groups[k:k + prompts] for i in grp])
            for k in range(0, len(groups), prompts)]


def budget_chunks(lengths: list[int], token_budget: int, groups: list[int] | None = None,
                  packed: bool = False) -> list[list[int]]:
    """Consecutive index chunks whose size fits `token_budget`: rows * longest row when
    padded, the sum of the lengths when `packed`.

    With `groups`, a chunk never splits a group (a group larger than the budget gets a chunk
    of its own). Order is preserved, so results map back by concatenation.
    """
    def size(chunk: list[int]) -> int:
        if packed:
            return sum(lengths[j] for j in chunk)
        return len(chunk) * max(lengths[j] for j in chunk)

    units: list[list[int]] = []
    for i in range(len(lengths)):
        if groups is not None and units and groups[units[-1][-1]] == groups[i]:
            units[-1].append(i)
        else:
            units.append([i])
    chunks: list[list[int]] = []
    cur: list[int] = []
    for unit in units:
        cand = cur + unit
        if cur and size(cand) > token_budget:
            chunks.append(cur)
            cand = list(unit)
        cur = cand
    if cur:
        chunks.append(cur)
    return chunks


def _row_masks(seqs: Sequences, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-layout [N, L] masks of sequences `index`: valid tokens, and 'resp_mask' (positions
    whose *next* token is a response token)."""
    lengths = [len(seqs.prompts[i]) + len(seqs.responses[i]) for i in index]
    valid = torch.zeros(len(index), max(lengths), dtype=torch.bool)
    resp = torch.zeros_like(valid)
    for row, i in enumerate(index):
        p, r = len(seqs.prompts[i]), len(seqs.responses[i])
        valid[row, : p + r] = True
        resp[row, p - 1: p + r - 1] = True
    return valid, resp


def to_micro_batch(seqs: Sequences, index: list[int], pad_id: int) -> MicroBatch:
    """Right-padded tokens [B, T] of sequences `index` (T: their longest), with `extra`:

    - 'resp_mask' [B, T]: positions whose *next* token is a response token;
    - 'targets' [B, T]: the next token at each position (pad at the end);
    - 'index': the sequence index of each row.
    """
    valid, resp = _row_masks(seqs, index)
    tokens = torch.full(valid.shape, pad_id, dtype=torch.long)
    for row, i in enumerate(index):
        ids = np.concatenate([seqs.prompts[i], seqs.responses[i]])
        tokens[row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    return MicroBatch(tokens, valid, {"resp_mask": resp, "targets": targets,
                                      "index": list(index)})


def to_packed_micro_batch(seqs: Sequences, index: list[int], pad_id: int,
                          align: int = 1) -> MicroBatch:
    """Sequences `index` end to end in tokens [1, T], no padding between them; T is rounded up
    to a multiple of `align` (the TP size under sequence parallelism) by one trailing segment
    of pad tokens that no row reads. 'targets' [1, T] is the next token within each sequence
    (pad at each sequence's last position); 'resp_mask' and `valid` are in the row layout, as
    in `to_micro_batch`, and `packing.gather` maps rows to packed positions."""
    valid, resp = _row_masks(seqs, index)
    ids = [np.concatenate([seqs.prompts[i], seqs.responses[i]]) for i in index]
    lengths = [len(x) for x in ids]
    total = sum(lengths)
    tail = -total % align
    flat = np.full(total + tail, pad_id, dtype=np.int64)
    targets = np.full(total + tail, pad_id, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for j, x in enumerate(ids):
        flat[starts[j]: starts[j + 1]] = x
        targets[starts[j]: starts[j + 1] - 1] = x[1:]
    cu = list(starts) + ([total + tail] if tail else [])
    gather = torch.as_tensor(starts[:-1], dtype=torch.long)[:, None] + torch.arange(valid.shape[1])
    gather = torch.where(valid, gather, torch.zeros_like(gather))
    packing = Packing(torch.tensor(cu, dtype=torch.int32), max(max(lengths), tail), gather)
    return MicroBatch(torch.from_numpy(flat)[None], valid,
                      {"resp_mask": resp, "targets": torch.from_numpy(targets)[None],
                       "index": list(index)}, packing)


def micro_batches(seqs: Sequences, token_budget: int, pad_id: int,
                  keep_groups: bool = False, packed: bool = False,
                  align: int = 1) -> list[MicroBatch]:
    """All of `seqs` as micro-batches: packed (`align`: see `to_packed_micro_batch`), or each
    padded only to its own longest row.

    Also at PP>1: the pipeline exchanges each micro-batch's activation shape first
    (Megatron's `variable_seq_lengths`, set by the builder when pp > 1). Padding every
    micro-batch to the largest row count times the longest sequence of the whole batch
    would cost up to rows x T_max activations per micro-batch.
    """
    if len(seqs) == 0:
        return []
    chunks = budget_chunks(seqs.lengths(), token_budget,
                           seqs.group if keep_groups else None, packed)
    if packed:
        return [to_packed_micro_batch(seqs, c, pad_id, align) for c in chunks]
    return [to_micro_batch(seqs, c, pad_id) for c in chunks]


def role_micro_batches(seqs: Sequences, token_budget: int, pad_id: int, perf, tp: int,
                       keep_groups: bool = False) -> list[MicroBatch]:
    """`micro_batches` in the layout a role's `perf` asks for (packed, aligned for sequence
    parallelism at TP size `tp`), on this rank's device."""
    from gad_megatron.models.perf import pack_align
    from gad_megatron.parallel.dist import device

    mbs = micro_batches(seqs, token_budget, pad_id, keep_groups=keep_groups,
                        packed=perf.packing, align=pack_align(perf, tp))
    return [mb.to(device()) for mb in mbs]


def per_sequence(values: torch.Tensor, mb: MicroBatch) -> list[np.ndarray]:
    """Split row-layout [N, L] position values (`MicroBatch.rows`) into per-sequence response
    arrays."""
    return [values[row][mb.extra["resp_mask"][row]].detach().cpu().numpy()
            for row in range(len(mb.extra["index"]))]
