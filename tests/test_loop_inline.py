"""The stage logic, driven in this process with one rank per role (the inline backend):
the same workers and steps the Ray backend runs, without Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gad_megatron.trainer import steps as steps_mod
from gad_megatron.trainer.backends import start_inline
from gad_megatron.trainer.controller import train
from gad_megatron.trainer.setup import build_loader, resolve_inputs
from tests.tiny_models import small_run


def tiny_cfg(tmp_path, stage="warmup", *extra):
    return small_run(tmp_path, stage, stage, "train.steps=3", "train.d_only_steps=1",
                     "rollout.max_new_tokens=12", *extra)


class Spy:
    """Wraps a role and records the order of its calls."""

    def __init__(self, role, log, name):
        self.role, self.log, self.name = role, log, name

    def __getattr__(self, attr):
        fn = getattr(self.role, attr)

        def wrapped(method, *args):
            self.log.append((self.name, method))
            return fn(method, *args)
        return wrapped


def context(cfg):
    inputs = resolve_inputs(cfg)
    loader = build_loader(cfg, inputs.tokenizer)
    roles = start_inline(cfg, inputs, total_steps=10)
    roles.rollout.sync_from(roles.actor)
    ctx = steps_mod.StepContext(cfg, roles.actor, roles.rollout, roles.disc, roles.ref,
                                pad_id=inputs.pad_id, eos_id=inputs.eos_id)
    return ctx, loader, roles


def actor_norm(roles) -> float:
    return roles.actor.call_all("weight_norm")[0]


def test_warmup_trains_only_d_for_the_first_d_only_steps(tmp_path):
    cfg = tiny_cfg(tmp_path, "warmup", "train.d_only_steps=2")
    ctx, loader, roles = context(cfg)
    norms = [actor_norm(roles)]
    for step in range(3):
        metrics = steps_mod.warmup_step(ctx, loader.next_batch(), step)
        norms.append(actor_norm(roles))
        assert all(math.isfinite(v) for v in metrics.values())
        assert ("g/sft_loss" in metrics) == (step >= 2)
    assert norms[0] == norms[1] == norms[2], "G must not change during the D-only steps"
    assert norms[3] != norms[2], "G must change once SFT starts"


def test_gad_rewards_are_scores_from_before_the_d_update(tmp_path):
    warm = tiny_cfg(tmp_path, "warmup", "train.steps=2")
    train(warm, backend="inline")
    cfg = tiny_cfg(tmp_path, "gad", f"train.init_from={tmp_path / 'warmup'}")
    ctx, loader, roles = context(cfg)
    log: list = []
    ctx.disc = Spy(roles.disc, log, "disc")
    ctx.actor = Spy(roles.actor, log, "actor")
    batch = loader.next_batch()
    samples_seen = {}
    real_score = steps_mod.score

    def score_and_keep(ctx_, teacher, samples, started=None):
        t, s, m = real_score(ctx_, teacher, samples, started)
        samples_seen.update(samples=samples, rewards=s)
        return t, s, m

    steps_mod.score = score_and_keep
    try:
        metrics = steps_mod.gad_step(ctx, batch, 0)
    finally:
        steps_mod.score = real_score
    disc_calls = [m for who, m in log if who == "disc"]
    assert disc_calls == ["scores", "scores", "bt_step"]
    # Step-0 invariants: the actor *is* the reference, so their log-probs agree and KL = 0.
    assert metrics["g/ref_logprob_max_diff"] == 0.0
    assert abs(metrics["g/kl"]) < 1e-7
    assert metrics["g/engine_logprob_max_diff"] < 1e-4
    assert np.isclose(metrics["g/reward_mean"], float(samples_seen["rewards"].mean()))
    after = np.asarray(roles.disc.map_sequences("scores", samples_seen["samples"]))
    assert not np.allclose(after, samples_seen["rewards"]), "D was updated after scoring"


def test_identical_answer_scores_exactly_the_teacher_score(tmp_path):
    cfg = tiny_cfg(tmp_path, "warmup")
    ctx, loader, roles = context(cfg)
    batch = loader.next_batch()
    teacher = steps_mod.teacher_sequences(batch)
    samples, staleness = steps_mod.sample(ctx, batch, 0)
    assert staleness == 0
    samples.responses[0] = list(teacher.responses[samples.group[0]])  # copy the teacher answer
    t, s, metrics = steps_mod.score(ctx, teacher, samples)
    assert s[0] == t[samples.group[0]]
    assert metrics["d/identical_count"] >= 1 and metrics["d/identical_abs_gap"] == 0.0
    out = roles.disc.train("bt_step", steps_mod.bt_pairs(teacher, samples), len(samples))
    assert math.isfinite(out["d_loss"])


def test_one_step_off_policy_runs_five_steps_and_logs_its_staleness(tmp_path, monkeypatch):
    """rollout.max_staleness=1: step t+1's generation is begun in step t before its weight
    sync, so from step 1 on every step trains on samples one policy version old."""
    from gad_megatron.trainer.backends import LocalRollout

    train(tiny_cfg(tmp_path, "warmup", "train.steps=2"), backend="inline")
    calls: list = []
    real_start, real_sync = LocalRollout.start_generate, LocalRollout.sync_from

    def start(self, *args, seed):
        calls.append(("generate", seed))
        return real_start(self, *args, seed=seed)

    def sync(self, actor):
        calls.append(("sync",))
        return real_sync(self, actor)

    monkeypatch.setattr(LocalRollout, "start_generate", start)
    monkeypatch.setattr(LocalRollout, "sync_from", sync)
    cfg = tiny_cfg(tmp_path, "gad", "train.steps=5", "rollout.max_staleness=1",
                   f"train.init_from={tmp_path / 'warmup'}")
    history = train(cfg, backend="inline")
    assert [m["rollout/staleness"] for m in history] == [0.0, 1.0, 1.0, 1.0, 1.0]
    seed = [cfg.train.seed * 100003 + step for step in range(5)]
    g = [("generate", s) for s in seed]
    # The start's sync; step 0 samples now and begins step 1's; the last step begins none.
    assert calls == [("sync",), g[0], g[1], ("sync",), g[2], ("sync",), g[3], ("sync",),
                     g[4], ("sync",), ("sync",)]
    assert all(math.isfinite(v) for m in history for v in m.values())


def test_lookahead_peeks_without_moving_the_resume_point(tmp_path):
    from gad_megatron.data.batching import Lookahead

    cfg = tiny_cfg(tmp_path)
    inputs = resolve_inputs(cfg)
    plain, ahead = (build_loader(cfg, inputs.tokenizer) for _ in range(2))
    ahead = Lookahead(ahead)
    first = plain.next_batch()
    assert ahead.next_batch().keys == first.keys
    state = ahead.state_dict()
    peeked = ahead.peek()
    assert ahead.peek() is peeked and ahead.state_dict() == state  # a peek saves nothing
    assert ahead.next_batch() is peeked and peeked.keys == plain.next_batch().keys
    ahead.peek()
    ahead.load_state_dict(state)  # a resume drops what was peeked
    assert ahead.next_batch().keys == peeked.keys


def test_seqkd_never_builds_a_discriminator(tmp_path, monkeypatch):
    from gad_megatron.workers import discriminator

    def refuse(*a, **k):
        raise AssertionError("seqkd must not build a discriminator")

    monkeypatch.setattr(discriminator.DiscriminatorWorker, "__init__", refuse)
    history = train(tiny_cfg(tmp_path, "seqkd"), backend="inline")
    assert len(history) == 3 and all(math.isfinite(m["g/sft_loss"]) for m in history)
    assert not list((tmp_path / "seqkd").rglob("discriminator"))


def test_seqkd_continues_from_a_warmup_checkpoint(tmp_path):
    """seqkd with init_from (the demo's equal-step baseline) starts from the warmup's actor,
    exactly as gad does; warmup refuses init_from and gad refuses a run without a D."""
    from gad_megatron.config import ConfigError

    train(tiny_cfg(tmp_path, "warmup", "train.steps=2"), backend="inline")
    init = f"train.init_from={tmp_path / 'warmup'}"
    norms = {}
    for stage in ("seqkd", "gad"):
        cfg = tiny_cfg(tmp_path, stage, init)
        inputs = resolve_inputs(cfg)
        assert (inputs.discriminator is None) == (stage == "seqkd")
        roles = start_inline(cfg, inputs, total_steps=2)
        try:
            norms[stage] = actor_norm(roles)
        finally:
            roles.shutdown()
    fresh = start_inline(tiny_cfg(tmp_path, "seqkd"), resolve_inputs(tiny_cfg(tmp_path, "seqkd")), 2)
    try:
        assert norms["seqkd"] == norms["gad"] != actor_norm(fresh)
    finally:
        fresh.shutdown()
    with pytest.raises(ConfigError, match="warmup starts from model.hf_path"):
        resolve_inputs(tiny_cfg(tmp_path, "warmup", init))
    train(tiny_cfg(tmp_path, "seqkd", init), backend="inline")
    with pytest.raises(ConfigError, match="has no discriminator"):
        resolve_inputs(tiny_cfg(tmp_path, "gad", f"train.init_from={tmp_path / 'seqkd'}"))


def test_throughput_figures_by_hand():
    from gad_megatron.workers.sequences import Sequences

    # Teacher: prompts of 3 and 2 tokens, answers of 4 and 1 -> 7 + 3 = 10 tokens.
    teacher = Sequences([[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [6]], [0, 1])
    # Samples: (3 + 2) + (3 + 0) + (2 + 5) = 15 tokens, of which 2 + 0 + 5 = 7 generated.
    samples = Sequences([[1, 2, 3], [1, 2, 3], [4, 5]], [[6, 7], [], [1, 1, 1, 1, 1]], [0, 0, 1])
    m = steps_mod.length_metrics(teacher, samples)
    assert m["perf/step_tokens"] == 25 and m["perf/generated_tokens"] == 7
    assert m["g/response_len_mean"] == 7 / 3 and m["g/teacher_len_mean"] == 2.5
    m.update({"time/step": 0.5, "time/rollout": 0.25})
    steps_mod.add_throughput(m)
    assert m["perf/tokens_per_s"] == 50.0 and m["perf/rollout_tokens_per_s"] == 28.0


def test_learning_on_the_builtin_task(tmp_path):
    """Over a short warmup D learns to tell teacher from student (d_acc > 0.5); over the gad
    stage G's samples score higher under a D frozen at the start of the stage."""
    common = ["train.prompts_per_step=16", "rollout.n=4", "rollout.max_new_tokens=48",
              "model.tiny_hidden=64", "train.save_every=0"]
    warm = tiny_cfg(tmp_path, "warmup", "train.steps=8", "train.d_only_steps=4", *common)
    history = train(warm, backend="inline")
    assert np.mean([m["d/d_acc"] for m in history[-3:]]) > 0.5
    gad = tiny_cfg(tmp_path, "gad", "train.steps=16", f"train.init_from={tmp_path / 'warmup'}",
                   "train.frozen_d_monitor=true", *common)
    history = train(gad, backend="inline")
    frozen = [m["g/frozen_d_reward"] for m in history]
    assert np.mean(frozen[-4:]) > np.mean(frozen[:4]), frozen
