"""Weight sync is exact: a Megatron actor at (tp, pp) in {(1,1), (2,1), (1,2)}, with weights
moved away from its HF file, streams into an HF engine (in the rank-0 process, through the
in-process transport, in several small buckets); the engine's weights then equal the actor's
export bit for bit, and the engine's greedy decoding equals the actor's own greedy decoding."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.dist_utils import run_parallel
from tests.tiny_models import VOCAB, make_hf_model

BUCKET_BYTES = 8 << 10  # the tiny model is ~100 KiB: many buckets, the embedding alone in one
PROMPTS = [[3, 14, 15, 92, 65], [35, 89]]
NEW_TOKENS = 5
NO_EOS = 10_000  # never sampled: greedy runs always produce NEW_TOKENS tokens


@torch.no_grad()
def perturb(model, arch, seed: int = 7) -> None:
    """Seeded noise on every weight; equal across TP ranks for replicated weights (so the
    sharded model stays one consistent model), per-rank for split ones."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        if arch.tie_word_embeddings and name == "output_layer.weight":
            continue  # the last stage's copy of a tied embedding; the export skips it
        split = getattr(p, "tensor_model_parallel", False)
        offset = zlib.crc32(name.encode()) + (tp_rank if split else 0)
        g = torch.Generator().manual_seed(seed + offset)
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def gather_vocab(local: torch.Tensor, vocab: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab]


@torch.no_grad()
def megatron_greedy(model, vocab: int, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with the Megatron model (pp == 1): full forward each step, argmax of
    the last position of the TP-gathered logits."""
    from gad_megatron.models.forward import MicroBatch, run_schedule

    tokens = list(prompt)
    for _ in range(steps):
        seq = torch.tensor([tokens])
        mb = MicroBatch(seq, torch.ones_like(seq, dtype=torch.bool), {})
        out = run_schedule(model, [mb], lambda o, _mb: gather_vocab(o, vocab)[0, -1])
        tokens.append(int(out[0].argmax()))
    return tokens[len(prompt):]


def _fail_send(bucket):
    raise AssertionError("only the sending rank (TP 0, PP 0, DP 0) may use the transport")


def sync_rank(rank, model_dir, tp, pp):
    from megatron.core import parallel_state as ps

    from gad_megatron.checkpoint.hf_io import export_hf_tensors, load_hf_weights
    from gad_megatron.models.builder import build_gpt
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.resharding.execute import sync_weights
    from gad_megatron.resharding.transport import CallbackTransport, InProcessTransport
    from gad_megatron.rollout.hf_engine import HFEngine

    arch = read_hf_config(model_dir)
    model = build_gpt(arch, tp, pp)
    load_hf_weights(model, arch, model_dir)
    model.eval()
    perturb(model, arch)
    engine = HFEngine.from_pretrained(model_dir, eos_id=NO_EOS, pad_id=0) if rank == 0 else None
    before = {k: v.clone() for k, v in engine.state_dict().items()} if engine else None
    transport = InProcessTransport(engine) if engine else CallbackTransport(_fail_send)
    stats = sync_weights(model, arch, transport, BUCKET_BYTES)
    exported = {n: t.clone() for n, t in export_hf_tensors(model, arch)}
    result = {}
    if engine is not None:
        result = {"exported": exported, "engine": engine.state_dict(), "before": before,
                  "stats": stats, "tied": arch.tie_word_embeddings}
    if pp == 1:  # greedy decoding needs every rank; the engine decodes on rank 0
        result["megatron_greedy"] = [megatron_greedy(model, arch.vocab_size, p, NEW_TOKENS)
                                     for p in PROMPTS]
        if engine is not None:
            g = engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0,
                                max_new_tokens=NEW_TOKENS, seed=0)
            result["engine_greedy"] = g.responses
    return result if engine is not None or ps.get_tensor_model_parallel_rank() else None


@pytest.mark.parametrize("family,tp,pp,tied", [("llama", 1, 1, False), ("qwen3", 2, 1, False),
                                               ("qwen2", 1, 2, True)])
def test_weight_sync_is_exact(tmp_path, family, tp, pp, tied):
    model_dir = make_hf_model(family, tmp_path / family, tie_word_embeddings=tied)
    results = run_parallel(sync_rank, tp=tp, pp=pp, args=(model_dir, tp, pp))
    r = results[0]
    exported, engine, before = r["exported"], r["engine"], r["before"]
    expected_names = set(engine) - ({"lm_head.weight"} if tied else set())
    assert set(exported) == expected_names
    for name, tensor in exported.items():
        assert not torch.equal(before[name], tensor), f"{name}: the perturbation missed it"
        assert engine[name].dtype == tensor.dtype and torch.equal(engine[name], tensor), name
    if tied:
        assert torch.equal(engine["lm_head.weight"], exported["model.embed_tokens.weight"])
    stats = r["stats"]
    assert stats.buckets > 3 and stats.tensors == len(exported)
    assert stats.peak_bucket_bytes <= max(BUCKET_BYTES, VOCAB * 32 * 4)
    if pp == 1:
        assert r["engine_greedy"] == r["megatron_greedy"]
        assert all(len(t) == NEW_TOKENS for t in r["engine_greedy"])
        if tp > 1:  # the other TP rank decoded the same tokens
            assert results[1]["megatron_greedy"] == r["megatron_greedy"]


def broadcast_rank(rank, model_dir, port, engine_dir):
    """Rank 0: a trainer replica that sends; rank 1: an engine process that receives, over
    a weight group of their own (gloo here, NCCL between GPUs), beside the default group.
    `engine_dir`: the model the engine holds (another shape: the sync must be refused)."""
    from gad_megatron.checkpoint.hf_io import export_hf_tensors, load_hf_weights
    from gad_megatron.models.builder import build_gpt
    from gad_megatron.models.hf_config import read_hf_config
    from gad_megatron.parallel.launch import LOOPBACK
    from gad_megatron.resharding.broadcast import GroupTransport
    from gad_megatron.resharding.execute import SyncMismatch, sync_weights
    from gad_megatron.resharding.weight_group import WeightGroup
    from gad_megatron.rollout.hf_engine import HFEngine
    from gad_megatron.rollout.receiver import HostReceiver

    group = WeightGroup(LOOPBACK, port, 2, rank, "gloo", timeout_s=60)
    arch = read_hf_config(model_dir)
    if rank == 0:
        model = build_gpt(arch, 1, 1)
        load_hf_weights(model, arch, model_dir)
        perturb(model, arch)
        try:
            stats = sync_weights(model, arch, GroupTransport(group), BUCKET_BYTES)
        except SyncMismatch as err:
            return {"refused": str(err)}
        return {"stats": stats, "exported": {n: t.clone() for n, t in export_hf_tensors(model, arch)}}
    engine = HFEngine.from_pretrained(engine_dir, eos_id=NO_EOS, pad_id=0)
    before = {k: v.clone() for k, v in engine.state_dict().items()}
    receiver = HostReceiver(engine)
    receiver.group = group
    try:
        buckets, nbytes = receiver.receive_weights()
    except SyncMismatch as err:
        return {"refused": str(err), "before": before, "engine": engine.state_dict()}
    return {"engine": engine.state_dict(), "before": before, "buckets": buckets, "bytes": nbytes}


def test_weight_sync_over_a_weight_group_is_exact(tmp_path):
    from gad_megatron.parallel.launch import free_port

    model_dir = make_hf_model("qwen3", tmp_path / "qwen3")
    # dp=2 only gives the two processes a world; rank 1 never builds an actor.
    sender, receiver = run_parallel(broadcast_rank, dp=2,
                                    args=(model_dir, free_port(), model_dir))
    exported, engine = sender["exported"], receiver["engine"]
    assert set(exported) == set(engine)
    for name, tensor in exported.items():
        assert not torch.equal(receiver["before"][name], tensor), name
        assert engine[name].dtype == tensor.dtype and torch.equal(engine[name], tensor), name
    stats = sender["stats"]
    assert receiver["buckets"] == stats.buckets > 3 and receiver["bytes"] == stats.bytes


def test_a_weight_group_sync_the_engine_cannot_take_is_refused_before_any_weight_changes(
        tmp_path):
    """The engine holds a model of another width: the manifest is refused on both sides,
    naming the tensor, and not one of the engine's weights changes."""
    from gad_megatron.parallel.launch import free_port

    model_dir = make_hf_model("qwen3", tmp_path / "qwen3")
    other = make_hf_model("qwen3", tmp_path / "wide", intermediate_size=96)
    sender, receiver = run_parallel(broadcast_rank, dp=2, args=(model_dir, free_port(), other))
    for side in (sender, receiver):
        assert "refused by the engine" in side["refused"]
        assert "'model.layers.0.mlp.gate_proj.weight' has shape [64, 32], the engine holds " \
               "[96, 32]" in side["refused"]
    for name, tensor in receiver["before"].items():
        assert torch.equal(receiver["engine"][name], tensor), name


def test_a_tied_model_syncs_over_a_weight_group(tmp_path):
    """A tied LM head is the embedding: the export sends it once, the engine asks for it once,
    and after the sync its head equals the new embedding."""
    from gad_megatron.parallel.launch import free_port

    model_dir = make_hf_model("qwen2", tmp_path / "tied", tie_word_embeddings=True)
    sender, receiver = run_parallel(broadcast_rank, dp=2,
                                    args=(model_dir, free_port(), model_dir))
    assert "refused" not in sender and "refused" not in receiver, sender.get("refused")
    exported, engine = sender["exported"], receiver["engine"]
    assert "lm_head.weight" not in exported
    for name, tensor in exported.items():
        assert torch.equal(engine[name], tensor), name
    assert torch.equal(engine["lm_head.weight"], exported["model.embed_tokens.weight"])
