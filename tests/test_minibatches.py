"""PPO mini-batches (issue 11 item 2): actor.mini_batch_prompts and
discriminator.mini_batch_prompts split each batch into whole prompt groups, one optimizer
step each, every loss normalised over its own mini-batch. Worked out by hand below."""

from __future__ import annotations

import pytest

from gad_megatron.config import load_config
from gad_megatron.trainer import steps as steps_mod
from gad_megatron.workers.sequences import Sequences, prompt_minibatches
from gad_megatron.trainer.controller import train
from tests.test_loop_inline import context, tiny_cfg


def test_split_keeps_groups_whole_and_in_order():
    # 4 prompts x 2 samples; response lengths 1..8.
    seqs = Sequences([[9]] * 8, [[5] * n for n in range(1, 9)], [0, 0, 1, 1, 2, 2, 3, 3],
                     {"advantage": [0.1 * i for i in range(8)]})
    parts = prompt_minibatches(seqs, 2)
    assert [p.group for p in parts] == [[0, 0, 1, 1], [2, 2, 3, 3]]
    # token-mean normalisers: 1+2+3+4 = 10 and 5+6+7+8 = 26 (not 36 each).
    assert [p.response_tokens() for p in parts] == [10, 26]
    assert parts[1].fields["advantage"] == pytest.approx([0.4, 0.5, 0.6, 0.7])
    assert prompt_minibatches(seqs, None) == [seqs] and prompt_minibatches(seqs, 4) == [seqs]
    # Groups that are not contiguous still stay whole (order of first appearance: 1, 0).
    mixed = Sequences([[9]] * 4, [[5], [5, 5], [5], [5, 5]], [1, 0, 1, 0])
    assert [p.group for p in prompt_minibatches(mixed, 1)] == [[1, 1], [0, 0]]


def test_a_mini_batch_size_that_does_not_divide_the_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"actor.mini_batch_prompts=3 must divide "
                                         r"train.prompts_per_step=4"):
        load_config(None, ["train.prompts_per_step=4", "actor.mini_batch_prompts=3"])
    with pytest.raises(ValueError, match=r"discriminator.parallel.dp=2 replicas no prompt"):
        load_config(None, ["train.prompts_per_step=4", "discriminator.mini_batch_prompts=1",
                           "discriminator.parallel.dp=2"])


class Recorder:
    """Wraps a real role and records each `train` call's method and arguments."""

    def __init__(self, role, calls):
        self.role, self.calls = role, calls

    def __getattr__(self, attr):
        fn = getattr(self.role, attr)
        if attr != "train":
            return fn

        def train(method, seqs, *args):
            self.calls.append((method, seqs, args))
            return fn(method, seqs, *args)
        return train


def test_gad_step_takes_one_optimizer_step_per_mini_batch(tmp_path):
    train(tiny_cfg(tmp_path, "warmup", "train.steps=1", "train.d_only_steps=0"),
          backend="inline")
    cfg = tiny_cfg(tmp_path, "gad", f"train.init_from={tmp_path / 'warmup'}",
                   "train.prompts_per_step=4", "rollout.n=2",
                   "actor.mini_batch_prompts=2", "discriminator.mini_batch_prompts=1",
                   "actor.ppo_epochs=2")
    ctx, loader, roles = context(cfg)
    calls: list = []
    ctx.actor, ctx.disc = Recorder(roles.actor, calls), Recorder(roles.disc, calls)
    metrics = steps_mod.gad_step(ctx, loader.next_batch(), 0)
    policy = [(s, a) for m, s, a in calls if m == "policy_step"]
    bt = [(s, a) for m, s, a in calls if m == "bt_step"]
    # actor: 4 prompts / 2 per mini-batch = 2 steps per pass, 2 passes = 4 steps.
    assert len(policy) == 4 and metrics["g/optimizer_steps"] == 4
    for seqs, (norm, _temperature) in policy:
        assert len(set(seqs.group)) == 2 and len(seqs) == 4  # 2 prompts x n=2, whole
        assert norm == seqs.response_tokens()  # token-mean over this mini-batch only
    assert sorted(g for s, _ in policy[:2] for g in set(s.group)) == [0, 1, 2, 3]
    # discriminator: one prompt per step: its teacher answer and its 2 samples, 2 pairs.
    assert len(bt) == 4 and metrics["d/optimizer_steps"] == 4
    for seqs, (pairs,) in bt:
        assert len(set(seqs.group)) == 1 and seqs.fields["is_teacher"].tolist() == [True, False, False]
        assert pairs == 2


def test_warmup_sft_steps_follow_the_actor_mini_batches(tmp_path):
    cfg = tiny_cfg(tmp_path, "warmup", "train.prompts_per_step=4", "train.d_only_steps=0",
                   "actor.mini_batch_prompts=1")
    ctx, loader, roles = context(cfg)
    calls: list = []
    ctx.actor = Recorder(roles.actor, calls)
    metrics = steps_mod.warmup_step(ctx, loader.next_batch(), 0)
    sft = [(s, a) for m, s, a in calls if m == "sft_step"]
    assert len(sft) == 4 and metrics["g/optimizer_steps"] == 4
    assert [norm for _, (norm,) in sft] == [len(s.responses[0]) for s, _ in sft]
