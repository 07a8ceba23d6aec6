"""Offload between calls (colocated runs): every storage of a role's weights, gradients and
Adam state goes to host memory and comes back bit for bit, and the training that follows is
the training a role that never left would have done."""

from __future__ import annotations

import torch

from gad_megatron.models.offload import HostCopy, offload, reload, training_tensors
from gad_megatron.trainer.backends import start_inline
from gad_megatron.trainer.roles import Role
from gad_megatron.trainer.setup import resolve_inputs
from gad_megatron.workers.sequences import Sequences
from tests.tiny_models import small_run

SEQS = Sequences([[1, 5, 6, 9], [2, 7]], [[7, 2, 4], [8, 9, 3, 2]])


def test_a_round_trip_frees_every_storage_and_keeps_every_view():
    base = torch.arange(12, dtype=torch.float32)
    a, b = base[:4].view(2, 2), base[4:]  # two views of one storage
    c = torch.ones(3, dtype=torch.bfloat16)
    copy = offload([a, b, c, None])
    assert isinstance(copy, HostCopy) and len(copy.storages) == 2
    assert copy.nbytes == 12 * 4 + 3 * 2
    assert base.untyped_storage().nbytes() == 0 and c.untyped_storage().nbytes() == 0
    reload(copy)
    assert torch.equal(base, torch.arange(12, dtype=torch.float32))
    assert torch.equal(a, base[:4].view(2, 2)) and torch.equal(b, base[4:])  # same views
    assert torch.equal(c, torch.ones(3, dtype=torch.bfloat16))


def _roles(tmp_path, name):
    cfg = small_run(tmp_path, name, "warmup", "train.steps=4")
    return start_inline(cfg, resolve_inputs(cfg), total_steps=4)


def _snapshot(worker) -> list[torch.Tensor]:
    return [t.clone() for t in training_tensors(worker.model, worker.optimizer)]


def test_the_actor_and_discriminator_come_back_bitwise(tmp_path):
    roles = _roles(tmp_path, "bitwise")
    actor, disc = roles.actor.group.worker, roles.disc.group.worker
    roles.actor.train("sft_step", SEQS, 7)  # Adam state and gradients exist from here
    for worker in (actor, disc):
        before = _snapshot(worker)
        moved = worker.offload()
        tensors = training_tensors(worker.model, worker.optimizer)
        assert moved >= sum(t.numel() * t.element_size() for t in before) // 2
        assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
        assert worker.offload() == moved  # a second offload changes nothing
        worker.reload()
        worker.reload()  # nor does a second reload
        after = training_tensors(worker.model, worker.optimizer)
        assert len(after) == len(before)
        for x, y in zip(before, after):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_steps_with_offload_between_calls_equal_steps_without(tmp_path):
    """Two identical actors: one offloads between every call (a colocated Role), one never
    does. Three SFT steps later their metrics and weights are identical."""
    kept, moved = _roles(tmp_path, "kept"), _roles(tmp_path, "moved")
    offloading = Role("actor", moved.actor.group, moved.actor.par, offload=True)
    assert moved.actor.group.worker.residency.offloaded  # offloaded from the start
    for _ in range(3):
        assert kept.actor.train("sft_step", SEQS, 7) == offloading.train("sft_step", SEQS, 7)
        assert moved.actor.group.worker.residency.offloaded  # given back after each
    offloading.group.call("reload")
    for x, y in zip(_snapshot(kept.actor.group.worker), _snapshot(moved.actor.group.worker)):
        assert torch.equal(x, y)


def test_a_weight_sync_brings_back_the_weights_alone(tmp_path):
    """reload(weights_only=True): parameters back (bitwise), gradients and Adam still on
    the host; the next full reload restores those too, and training goes on unchanged."""
    roles = _roles(tmp_path, "weights")
    actor = roles.actor.group.worker
    roles.actor.train("sft_step", SEQS, 7)
    from gad_megatron.models.offload import state_tensors, weight_tensors

    weights = [t.clone() for t in weight_tensors(actor.model)]
    state = [t.clone() for t in state_tensors(actor.model, actor.optimizer)]
    actor.offload()
    actor.reload(weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(weights, weight_tensors(actor.model)))
    grads = [b.grad_data for b in actor.model.__dict__["buffers"]]
    assert all(g.untyped_storage().nbytes() == 0 for g in grads)
    actor.offload()  # the weights go again; the state was never back
    actor.reload()
    assert all(torch.equal(x, y) for x, y in zip(state, state_tensors(actor.model, actor.optimizer)))
