"""Group-aware batches, padding/packing helpers and a resumable, seeded loader.

A batch is a list of prompt groups: one prompt, its teacher answer, and (filled in by the
trainer) n student samples. Student samples are always passed group-major: sample j of
group g sits at position g * n + j, and every helper returns `group_index` so losses can
be reduced per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from gad_megatron.data.config import DataConfig, DataError
from gad_megatron.data.dataset import Example, TokenDataset

Ids = Sequence[int] | np.ndarray


@dataclass(frozen=True)
class PaddedBatch:
    """Sequences padded into `[B, T]` tensors."""

    tokens: torch.Tensor  # long [B, T]
    attention_mask: torch.Tensor  # bool [B, T], True on real tokens
    response_mask: torch.Tensor  # bool [B, T], True on response (answer) tokens
    position_ids: torch.Tensor  # long [B, T], 0.. per sequence, 0 on padding
    group_index: torch.Tensor  # long [B], the prompt group of each row
    prompt_lengths: torch.Tensor  # long [B]
    response_lengths: torch.Tensor  # long [B]


@dataclass(frozen=True)
class PackedBatch:
    """Sequences concatenated into one row, as Megatron's `PackedSeqParams` (qkv_format
    "thd") expects: pass `cu_seqlens` as cu_seqlens_q/kv, `cu_seqlens_padded` as
    cu_seqlens_q/kv_padded and `max_seqlen` as max_seqlen_q/kv."""

    tokens: torch.Tensor  # long [1, total]
    position_ids: torch.Tensor  # long [1, total], restarting at 0 for every sequence
    response_mask: torch.Tensor  # bool [1, total]
    cu_seqlens: torch.Tensor  # int32 [N + 1], cumulative real lengths
    cu_seqlens_padded: torch.Tensor  # int32 [N + 1], cumulative lengths after `align`
    max_seqlen: int  # longest real sequence
    group_index: torch.Tensor  # long [N]


def pad_sequences(prompts: Sequence[Ids], responses: Sequence[Ids] | None = None, *,
                  pad_id: int, side: str = "right", pad_to_multiple: int = 1,
                  group_index: Sequence[int] | None = None) -> PaddedBatch:
    """Pad `prompt + response` sequences to `[B, T]`; `side` is `right` (training) or
    `left` (generation, so every prompt ends at the same column)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    seqs, plen, rlen, gidx = _join_pairs(prompts, responses, group_index)
    lengths = plen + rlen
    width = int(lengths.max(initial=0))
    width = -(-width // pad_to_multiple) * pad_to_multiple
    bsz = len(seqs)
    tokens = np.full((bsz, width), pad_id, np.int64)
    attn = np.zeros((bsz, width), bool)
    resp = np.zeros((bsz, width), bool)
    pos = np.zeros((bsz, width), np.int64)
    for b, seq in enumerate(seqs):
        start = 0 if side == "right" else width - len(seq)
        end = start + len(seq)
        tokens[b, start:end] = seq
        attn[b, start:end] = True
        resp[b, start + plen[b]:end] = True
        pos[b, start:end] = np.arange(len(seq))
    return PaddedBatch(*map(torch.from_numpy, (tokens, attn, resp, pos, gidx, plen, rlen)))


def pack_sequences(prompts: Sequence[Ids], responses: Sequence[Ids] | None = None, *,
                   pad_id: int, align: int = 1,
                   group_index: Sequence[int] | None = None) -> PackedBatch:
    """Concatenate `prompt + response` sequences with no padding between them, except
    that each may be padded to a multiple of `align` (context parallelism wants 2*cp)."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    seqs, plen, rlen, gidx = _join_pairs(prompts, responses, group_index)
    lengths = plen + rlen
    padded = -(-lengths // align) * align
    cu = np.zeros(len(seqs) + 1, np.int64)
    cu_pad = np.zeros(len(seqs) + 1, np.int64)
    np.cumsum(lengths, out=cu[1:])
    np.cumsum(padded, out=cu_pad[1:])
    total = int(cu_pad[-1])
    tokens = np.full(total, pad_id, np.int64)
    resp = np.zeros(total, bool)
    pos = np.zeros(total, np.int64)
    for b, seq in enumerate(seqs):
        s = int(cu_pad[b])
        tokens[s:s + len(seq)] = seq
        resp[s + plen[b]:s + len(seq)] = True
        pos[s:s + int(padded[b])] = np.arange(int(padded[b]))
    return PackedBatch(
        tokens=torch.from_numpy(tokens)[None], position_ids=torch.from_numpy(pos)[None],
        response_mask=torch.from_numpy(resp)[None],
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        cu_seqlens_padded=torch.from_numpy(cu_pad.astype(np.int32)),
        max_seqlen=int(lengths.max(initial=0)), group_index=torch.from_numpy(gidx))


def _join_pairs(prompts, responses, group_index):
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if group_index is not None and len(group_index) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(group_index)} group indices")
    seqs, plen, rlen = [], [], []
    for i, p in enumerate(prompts):
        r = np.asarray(responses[i] if responses is not None else [], np.int64)
        p = np.asarray(p, np.int64)
        seqs.append(np.concatenate([p, r]))
        plen.append(len(p))
        rlen.append(len(r))
    gidx = np.asarray(group_index if group_index is not None else range(len(prompts)), np.int64)
    return seqs, np.asarray(plen, np.int64), np.asarray(rlen, np.int64), gidx


@dataclass(frozen=True)
class PromptGroup:
    """One prompt of a batch with its teacher answer; student samples are added by the
    trainer via `Batch.student(...)`."""

    group_index: int  # position of the group in its batch
    example: Example  # dataset row (index, key, prompt_ids, teacher_ids)

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.example.prompt_ids

    @property
    def teacher_ids(self) -> np.ndarray:
        return self.example.teacher_ids


@dataclass(frozen=True)
class Batch:
    """A list of prompt groups, plus where it came from in the epoch."""

    groups: tuple[PromptGroup, ...]
    epoch: int  # epoch this batch belongs to
    step_in_epoch: int  # 0-based batch number within the epoch

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def prompt_ids(self) -> list[np.ndarray]:
        return [g.prompt_ids for g in self.groups]

    @property
    def teacher_ids(self) -> list[np.ndarray]:
        return [g.teacher_ids for g in self.groups]

    @property
    def group_index(self) -> list[int]:
        return [g.group_index for g in self.groups]

    @property
    def keys(self) -> list[str]:
        return [g.example.key for g in self.groups]

    def prompts(self, pad_id: int, n_samples: int = 1, side: str = "left") -> PaddedBatch:
        """Generation input: each prompt repeated `n_samples` times, group-major."""
        reps = [p for p in self.prompt_ids for _ in range(n_samples)]
        return pad_sequences(reps, None, pad_id=pad_id, side=side,
                             group_index=self._repeat_index(n_samples))

    def teacher(self, pad_id: int, side: str = "right") -> PaddedBatch:
        """Prompt + teacher answer per group, `[B, T]`."""
        return pad_sequences(self.prompt_ids, self.teacher_ids, pad_id=pad_id, side=side,
                             group_index=self.group_index)

    def teacher_packed(self, pad_id: int, align: int = 1) -> PackedBatch:
        return pack_sequences(self.prompt_ids, self.teacher_ids, pad_id=pad_id, align=align,
                              group_index=self.group_index)

    def student(self, samples: Sequence[Ids], pad_id: int, side: str = "right") -> PaddedBatch:
        """Prompt + student sample per sample (`B * n` rows, group-major)."""
        n = self._samples_per_group(samples)
        reps = [p for p in self.prompt_ids for _ in range(n)]
        return pad_sequences(reps, samples, pad_id=pad_id, side=side,
                             group_index=self._repeat_index(n))

    def student_packed(self, samples: Sequence[Ids], pad_id: int, align: int = 1) -> PackedBatch:
        n = self._samples_per_group(samples)
        reps = [p for p in self.prompt_ids for _ in range(n)]
        return pack_sequences(reps, samples, pad_id=pad_id, align=align,
                              group_index=self._repeat_index(n))

    def _samples_per_group(self, samples: Sequence[Ids]) -> int:
        if not self.groups or len(samples) % len(self.groups):
            raise ValueError(f"{len(samples)} samples for {len(self.groups)} groups; "
                             "pass n samples per group, group-major")
        return len(samples) // len(self.groups)

    def _repeat_index(self, n: int) -> list[int]:
        return [g for g in self.group_index for _ in range(n)]


class GroupLoader:
    """Seeded, resumable batches of prompt groups over a `TokenDataset`.

    Epoch e visits rows in `permutation(seed, e)` order (identity when not shuffling).
    Every data-parallel rank computes the same global batch and keeps its own contiguous
    slice. Iteration runs over epochs without end; `one_epoch()` stops at the epoch's end.
    """

    def __init__(self, dataset: TokenDataset, prompts_per_batch: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, dp_rank: int = 0,
                 dp_size: int = 1) -> None:
        if prompts_per_batch < 1:
            raise DataError(f"prompts_per_batch must be >= 1, got {prompts_per_batch}")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if prompts_per_batch % dp_size:
            raise DataError(f"prompts_per_batch {prompts_per_batch} is not divisible by "
                            f"the data-parallel size {dp_size}")
        if len(dataset) == 0 or (drop_last and len(dataset) < prompts_per_batch):
            raise DataError(f"{len(dataset)} rows cannot fill one batch of "
                            f"{prompts_per_batch} prompts (drop_last={drop_last})")
        self.dataset = dataset
        self.prompts_per_batch = prompts_per_batch
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache

    @classmethod
    def from_config(cls, dataset: TokenDataset, cfg: DataConfig, *, train: bool = True,
                    dp_rank: int = 0, dp_size: int = 1) -> "GroupLoader":
        """Training loaders follow cfg's shuffle/drop_last; eval loaders keep file order
        and every row."""
        return cls(dataset, cfg.prompts_per_batch, seed=cfg.seed,
                   shuffle=cfg.shuffle and train, drop_last=cfg.drop_last and train,
                   dp_rank=dp_rank, dp_size=dp_size)

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.dataset), self.prompts_per_batch
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Row order of `epoch`."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
            self._order = (epoch, perm)
        return self._order[1]

    def next_batch(self) -> Batch:
        """This rank's slice of the next global batch (rolling over to the next epoch)."""
        if self.step_in_epoch >= self.batches_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        b = self.prompts_per_batch
        rows = self.order(self.epoch)[self.step_in_epoch * b:(self.step_in_epoch + 1) * b]
        mine = np.array_split(rows, self.dp_size)[self.dp_rank]
        batch = Batch(tuple(PromptGroup(g, self.dataset[int(i)]) for g, i in enumerate(mine)),
                      self.epoch, self.step_in_epoch)
        self.step_in_epoch += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def one_epoch(self) -> Iterator[Batch]:
        """The batches left in the current epoch (all of them from a fresh loader)."""
        if self.step_in_epoch >= self.batches_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        while self.step_in_epoch < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Position for exact resume (plain ints, safe to store in any checkpoint)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_rows": len(self.dataset), "prompts_per_batch": self.prompts_per_batch,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; refuses a state from a different data setup,
        since the same position would then mean different rows."""
        for key in ("num_rows", "prompts_per_batch", "shuffle", "drop_last"):
            mine = len(self.dataset) if key == "num_rows" else getattr(self, key)
            if key in state and state[key] != mine:
                raise DataError(f"loader state has {key}={state[key]!r} but this loader has "
                                f"{mine!r}; the data or batch settings changed since it was saved")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self._order = None


class Lookahead:
    """A loader that can hand out the next batch early (`peek`) without moving its resume
    point: `state_dict` stays where the last batch taken by `next_batch` left it, so a run
    stopped after a peek redoes the peeked batch (one-step off-policy sampling peeks)."""

    def __init__(self, loader: GroupLoader):
        self.loader = loader
        self._peeked: Batch | None = None
        self._state_before_peek: dict[str, Any] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.loader.batches_per_epoch

    def peek(self) -> Batch:
        if self._peeked is None:
            self._state_before_peek = self.loader.state_dict()
            self._peeked = self.loader.next_batch()
        return self._peeked

    def next_batch(self) -> Batch:
        if self._peeked is None:
            return self.loader.next_batch()
        batch, self._peeked, self._state_before_peek = self._peeked, None, None
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._state_before_peek or self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._peeked = self._state_before_peek = None
        self.loader.load_state_dict(state)
