"""The weight-sync plan: which tensor leaves which trainer stage, merged how, in which bucket,
and which engine rank owns which slice of it. A pure function of the layouts and the name
table, so it is table-tested without ranks (tests/test_resharding_plan.py).

What the executor does today (execute.py) follows the plan's model:
- every Megatron parameter lives on one pipeline stage, is gathered over the trainer's TP
  group there and merged into HF tensors with its split rule (checkpoint/name_map.py);
- the merged HF tensors reach one sending rank (TP 0, PP 0, DP 0), are packed into buckets of
  at most `bucket_bytes` (a tensor larger than that gets a bucket of its own), and each bucket
  is handed to the transport; the peak extra memory of a sync is therefore one bucket.

Engine side: vLLM and SGLang take HF-named *full* tensors and cut each engine-TP rank's shard
themselves (the model's `load_weights`), so with today's transports every engine rank
receives every tensor (`SyncOp.receivers`). The plan still records the slice each engine rank
owns (`SyncOp.engine_dim`, `engine_slice`) so that a shard-to-shard transport (each engine
rank receiving only its slice, e.g. over NCCL) can be built on the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gad_megatron.checkpoint import name_map as nm
from gad_megatron.models.hf_config import HFArch

# How an engine (vLLM/SGLang, Megatron-style TP) splits each HF tensor over its TP ranks:
# the dim it cuts, or None for replicated. Keyed by the last two name components.
ENGINE_DIMS = {
    "embed_tokens.weight": 0, "lm_head.weight": 0,
    "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0,
    "q_proj.bias": 0, "k_proj.bias": 0, "v_proj.bias": 0,
    "o_proj.weight": 1, "gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1,
}
KV_NAMES = ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")


@dataclass(frozen=True)
class ParamMeta:
    """One Megatron parameter as the sync sees it."""

    megatron: str
    """Megatron name (local spec) with the global layer index."""
    hf_names: tuple[str, ...]
    """The HF tensors it merges into, in the split rule's order."""
    hf_shapes: tuple[tuple[int, ...], ...]
    """Full HF shape of each of `hf_names`."""
    stage: int
    """Pipeline stage that holds it."""
    split: str
    """Its name-table split rule (how TP shards merge back)."""
    dtype: torch.dtype = torch.float32

    def nbytes(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(_numel(s) for s in self.hf_shapes) * item


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def stage_of_layer(layer: int, num_layers: int, pp: int) -> int:
    """Layers are split evenly over the pipeline stages (check_parallel enforces divisibility)."""
    return layer // (num_layers // pp)


def param_metas(arch: HFArch, pp: int, dtype: torch.dtype = torch.float32) -> list[ParamMeta]:
    """Every exported Megatron parameter, stage by stage in layer order.

    The embedding is on stage 0; the final norm and the output layer on the last stage. With
    tied embeddings the last stage's output-layer copy is not exported (HF has no lm_head
    then), so the embedding is sent once.
    """
    if arch.num_layers % pp:
        raise ValueError(f"pp={pp} does not divide num_hidden_layers={arch.num_layers}")
    shapes = nm.expected_hf_shapes(arch)
    out: list[ParamMeta] = []
    rules = nm.rules_for(arch)
    layer_rules = [r for r in rules if nm.LAYER in r.megatron]
    head = [r for r in rules if r.megatron.startswith("embedding.")]
    tail = [r for r in rules if nm.LAYER not in r.megatron and r not in head]

    def add(rule: nm.Rule, layer: int | None, stage: int) -> None:
        names = nm.Match(rule, layer).hf_names()
        out.append(ParamMeta(rule.megatron.replace(nm.LAYER, str(layer)), names,
                             tuple(shapes[n] for n in names), stage, rule.split, dtype))

    for rule in head:
        add(rule, None, 0)
    for layer in range(arch.num_layers):
        for rule in layer_rules:
            add(rule, layer, stage_of_layer(layer, arch.num_layers, pp))
    for rule in tail:
        add(rule, None, pp - 1)
    return out


@dataclass(frozen=True)
class SyncOp:
    """The transfer of one HF tensor."""

    hf_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    megatron: str
    """The Megatron parameter it comes from."""
    src_stage: int
    """Pipeline stage that gathers it over TP; stages > 0 broadcast it to the sending rank."""
    tp_merge: str
    """Name-table merge rule applied to the trainer's TP shards; 'none' at trainer TP 1."""
    bucket: int
    receivers: tuple[int, ...]
    """Engine TP ranks that receive the full tensor (all of them: the engine re-shards)."""
    engine_dim: int | None
    """Dim the engine splits it on over its TP ranks; None when every rank keeps it whole."""


@dataclass(frozen=True)
class SyncPlan:
    trainer_tp: int
    trainer_pp: int
    engine_tp: int
    bucket_bytes: int
    ops: tuple[SyncOp, ...]
    sender: tuple[int, int, int] = (0, 0, 0)
    """(tp rank, pp rank, dp rank) of the one trainer rank that hands buckets to the transport."""

    def buckets(self) -> list[list[SyncOp]]:
        out: list[list[SyncOp]] = []
        for op in self.ops:
            if op.bucket == len(out):
                out.append([])
            out[op.bucket].append(op)
        return out

    def bucket_sizes(self) -> list[int]:
        return [sum(op.nbytes for op in b) for b in self.buckets()]

    @property
    def peak_bytes(self) -> int:
        """Extra memory the sending rank holds at once: the largest bucket."""
        return max(self.bucket_sizes(), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def for_engine_rank(self, rank: int) -> list[SyncOp]:
        return [op for op in self.ops if rank in op.receivers]


def closes_before(bucket_used: int, bucket_count: int, nbytes: int, bucket_bytes: int) -> bool:
    """Whether a tensor of `nbytes` must start a new bucket: it would overflow a non-empty one.

    Shared by the plan and the executor so both pack identically.
    """
    return bucket_count > 0 and bucket_used + nbytes > bucket_bytes


def assign_buckets(sizes: list[int], bucket_bytes: int) -> list[int]:
    """Greedy in-order packing; a tensor larger than a bucket gets a bucket of its own."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    out, bucket, used, count = [], 0, 0, 0
    for size in sizes:
        if closes_before(used, count, size, bucket_bytes):
            bucket, used, count = bucket + 1, 0, 0
        out.append(bucket)
        used, count = used + size, count + 1
    return out


def engine_dim(hf_name: str) -> int | None:
    return ENGINE_DIMS.get(".".join(hf_name.split(".")[-2:]))


def plan_sync(trainer_tp: int, trainer_pp: int, engine_tp: int, params: list[ParamMeta],
              bucket_bytes: int) -> SyncPlan:
    """The ordered transfers of a weight sync (see the module docstring)."""
    if min(trainer_tp, trainer_pp, engine_tp) < 1:
        raise ValueError("tp, pp and engine_tp must be >= 1")
    if any(p.stage >= trainer_pp for p in params):
        raise ValueError(f"a parameter lives on a stage >= trainer_pp={trainer_pp}")
    flat = [(p, name, shape) for p in params for name, shape in zip(p.hf_names, p.hf_shapes)]
    item = {p.dtype: torch.empty((), dtype=p.dtype).element_size() for p in params}
    sizes = [_numel(shape) * item[p.dtype] for p, _, shape in flat]
    everyone = tuple(range(engine_tp))
    ops = tuple(
        SyncOp(hf_name=name, shape=shape, dtype=p.dtype, nbytes=size, megatron=p.megatron,
               src_stage=p.stage, tp_merge=p.split if trainer_tp > 1 else "none",
               bucket=bucket, receivers=everyone, engine_dim=engine_dim(name))
        for (p, name, shape), size, bucket in zip(flat, sizes, assign_buckets(sizes, bucket_bytes)))
    return SyncPlan(trainer_tp, trainer_pp, engine_tp, bucket_bytes, ops)


def engine_slice(op: SyncOp, engine_rank: int, engine_tp: int, arch: HFArch
                 ) -> tuple[int, int, int] | None:
    """(dim, start, stop) of `op`'s tensor that engine rank `engine_rank` keeps; None = whole.

    K/V with fewer KV heads than engine ranks are replicated: each KV head is kept by
    engine_tp / num_kv_heads consecutive ranks (as vLLM and SGLang do).
    """
    if op.engine_dim is None or engine_tp == 1:
        return None
    size = op.shape[op.engine_dim]
    if op.hf_name.endswith(KV_NAMES) and arch.num_kv_heads < engine_tp:
        if engine_tp % arch.num_kv_heads:
            raise ValueError(f"engine_tp={engine_tp} is not a multiple of "
                             f"num_key_value_heads={arch.num_kv_heads}")
        head = engine_rank // (engine_tp // arch.num_kv_heads)
        return op.engine_dim, head * arch.head_dim, (head + 1) * arch.head_dim
    if op.hf_name.endswith(("embed_tokens.weight", "lm_head.weight")):
        per = -(-size // engine_tp)  # the engine pads the vocab; the last rank gets the rest
        return op.engine_dim, min(size, engine_rank * per), min(size, (engine_rank + 1) * per)
    if size % engine_tp:
        raise ValueError(f"engine_tp={engine_tp} does not divide {op.hf_name} dim "
                         f"{op.engine_dim} ({size})")
    per = size // engine_tp
    return op.engine_dim, engine_rank * per, (engine_rank + 1) * per
