"""One training step per stage, as an ordered list of calls on the roles.

Pure orchestration: tensors maths lives in gad_megatron.algorithms, model work in the workers.
Each step returns a flat dict of metrics for the step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from gad_megatron import algorithms as alg
from gad_megatron.config.schema import GADConfig
from gad_megatron.workers.sequences import Sequences, as_token_ids, prompt_minibatches


class Prefetch(NamedTuple):
    """A generation begun for `step` while the engine had weights of `version`."""

    step: int
    version: int
    pending: Any  # .result() -> Generation


@dataclass
class StepContext:
    """What a step needs: the config, the roles, the rollout, and token ids."""

    cfg: GADConfig
    actor: Any
    rollout: Any
    disc: Any = None
    ref: Any = None
    monitor: Any = None
    """A frozen discriminator used for measurement only (train.frozen_d_monitor)."""
    pad_id: int = 0
    eos_id: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    upcoming: Callable[[], Any] | None = None
    """The next step's batch, when there is one (the loader's peek)."""
    policy_version: int = 0
    """Weight syncs to the engine so far: the version of the weights it samples from."""
    prefetched: "Prefetch | None" = None
    """The next step's generation, begun a step early (rollout.max_staleness=1)."""
    last_pairs: Any = None
    """(teacher, samples, teacher scores, sample scores) of the latest scoring, for reports."""
    judge: Any = None
    """reward.task's acceptance test (data/task_judge.TaskJudge), or None."""
    teacher_pool: Any = None
    """Every teacher answer by prompt (data/negatives.TeacherPool), for 'splice' negatives."""

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"time/{name}"] = time.perf_counter() - start


def _lists(arrays) -> list[list[int]]:
    return [np.asarray(a).tolist() for a in arrays]


def teacher_sequences(batch) -> Sequences:
    n = len(batch.prompt_ids)
    return Sequences(list(batch.prompt_ids), list(batch.teacher_ids), list(range(n)))


def _start_generation(ctx: StepContext, batch, step: int):
    r = ctx.cfg.rollout
    return ctx.rollout.start_generate(_lists(batch.prompt_ids), r.n, r.temperature, r.top_p,
                                      r.max_new_tokens, seed=ctx.cfg.train.seed * 100003 + step)


def sample(ctx: StepContext, batch, step: int) -> tuple[Sequences, int]:
    """n samples per prompt from the student (prompt-major, grouped by prompt), and their
    staleness: how many weight syncs the engine is behind the trainer (0 on-policy).

    On-policy, from the current weights. With rollout.max_staleness=1 the samples were begun
    during the previous step (from the weights before its update), and this step's end
    begins the next step's, so the engine generates while the trainer trains."""
    with ctx.phase("rollout"):
        early, ctx.prefetched = ctx.prefetched, None
        if early is None or early.step != step:  # on-policy, the first step, after a resume
            early = Prefetch(step, ctx.policy_version, _start_generation(ctx, batch, step))
        gen = early.pending.result()
        if ctx.cfg.rollout.max_staleness and ctx.upcoming is not None:
            ctx.prefetched = Prefetch(step + 1, ctx.policy_version,
                                      _start_generation(ctx, ctx.upcoming(), step + 1))
    return generated_sequences(batch, gen), ctx.policy_version - early.version


def generated_sequences(batch, gen) -> Sequences:
    """An engine's `Generation` for `batch` as Sequences: grouped by prompt, each prompt's
    ids one array shared by its samples, the engine's log-probs as float32 arrays."""
    engine_lp = [np.asarray(lp, dtype=np.float32) for lp in gen.logprobs]
    ids = [as_token_ids(p) for p in batch.prompt_ids]
    return Sequences([ids[g] for g in gen.group_index], gen.responses,
                     list(gen.group_index), {"engine_logprobs": engine_lp})


def bt_pairs(teacher: Sequences, samples: Sequences) -> Sequences:
    """Group-ordered sequences for the BT update: each teacher answer, then its samples."""
    prompts, responses, group, is_teacher = [], [], [], []
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(samples.group):
        by_group.setdefault(g, []).append(i)
    for g in range(len(teacher)):
        prompts.append(teacher.prompts[g]), responses.append(teacher.responses[g])
        group.append(g), is_teacher.append(True)
        for i in by_group.get(g, []):
            prompts.append(samples.prompts[i]), responses.append(samples.responses[i])
            group.append(g), is_teacher.append(False)
    return Sequences(prompts, responses, group, {"is_teacher": np.asarray(is_teacher)})


def start_scores(ctx: StepContext, teacher: Sequences, samples: Sequences):
    """D's scoring of teacher answers and samples, started (see `Role.start_map`)."""
    return ctx.disc.start_map("scores", teacher), ctx.disc.start_map("scores", samples)


def score(ctx: StepContext, teacher: Sequences, samples: Sequences, started=None):
    """D's scores of teacher answers and samples (before D's update this step) + metrics;
    `started`: the scoring as `start_scores` began it."""
    with ctx.phase("score"):
        pending = started or start_scores(ctx, teacher, samples)
        t, s = (np.asarray(p.result(), dtype=np.float32) for p in pending)
    t_rep = torch.from_numpy(t[np.asarray(samples.group)])
    identical = torch.tensor([np.array_equal(samples.responses[i], teacher.responses[g])
                              for i, g in enumerate(samples.group)])
    metrics = alg.discriminator_metrics(t_rep, torch.from_numpy(s), identical)
    ctx.last_pairs = (teacher, samples, t, s)
    return t, s, {f"d/{k}": v for k, v in metrics.items()}


def judge_samples(ctx: StepContext, teacher_scores, samples: Sequences, sample_scores):
    """The task test's verdict on each sample ([N] bool, or None without reward.task) and
    how D's scores agree with it (algorithms.oracle; undefined figures are left out)."""
    if ctx.judge is None:
        return None, {}
    accepted = ctx.judge(samples.prompts, samples.responses)
    figures = alg.oracle_metrics(torch.from_numpy(np.asarray(teacher_scores)),
                                 torch.from_numpy(np.asarray(sample_scores)),
                                 torch.from_numpy(accepted), torch.tensor(samples.group))
    rate = figures.pop("accept_rate")
    return accepted, {"task/accept_rate": rate, **{f"d/{k}": v for k, v in figures.items()}}


def mean_metrics(per_step: list[dict]) -> dict:
    """Each metric's mean over the optimizer steps of one batch, and how many steps ran."""
    keys = {k for m in per_step for k in m}
    out = {k: float(np.mean([m[k] for m in per_step if k in m])) for k in sorted(keys)}
    return {**out, "optimizer_steps": len(per_step)} if out else {}


def teacher_negatives(ctx: StepContext, teacher: Sequences, step: int) -> Sequences:
    """discriminator.negatives made from this step's teacher answers (data/negatives.py),
    seeded by the run's seed and the step; grouped like the samples of their prompt."""
    from gad_megatron.data.negatives import make_negatives

    d = ctx.cfg.discriminator
    rng = np.random.default_rng([ctx.cfg.train.seed, step, 0x6E6567])
    partners = None
    if ctx.teacher_pool is not None:
        partners = [ctx.teacher_pool.others(p, r)
                    for p, r in zip(teacher.prompts, teacher.responses)]
    responses, group = make_negatives(teacher.prompts, teacher.responses, d.negatives,
                                      d.negatives_per_kind, rng, ctx.eos_id, partners)
    return Sequences([teacher.prompts[g] for g in group], responses, group)


def update_discriminator(ctx: StepContext, teacher: Sequences, samples: Sequences,
                         step: int) -> dict:
    """BT steps over mini-batches of prompts; each normalised by its own pair count. The
    pairs: every sample, plus discriminator.negatives made from the teacher answers;
    discriminator.updates_per_step passes over them."""
    d = ctx.cfg.discriminator
    extra = {}
    if d.negatives:
        negs = teacher_negatives(ctx, teacher, step)
        extra["d/negatives"] = float(len(negs))
        samples = Sequences(samples.prompts + negs.prompts, samples.responses + negs.responses,
                            samples.group + negs.group)
    parts = prompt_minibatches(bt_pairs(teacher, samples), d.mini_batch_prompts)
    with ctx.phase("d_update"):
        out = [ctx.disc.train("bt_step", p, sum(not t for t in p.fields["is_teacher"]))
               for _ in range(d.updates_per_step) for p in parts]
    return {**{f"d/{k}": v for k, v in mean_metrics(out).items()}, **extra}


def sft_update(ctx: StepContext, teacher: Sequences) -> dict:
    """SFT steps over mini-batches of teacher answers, each token-mean over its own tokens."""
    parts = prompt_minibatches(teacher, ctx.cfg.actor.mini_batch_prompts)
    with ctx.phase("g_update"):
        out = [ctx.actor.train("sft_step", p, p.response_tokens()) for p in parts]
    return {f"g/{k}": v for k, v in mean_metrics(out).items()}


def sync_rollout(ctx: StepContext) -> None:
    with ctx.phase("weight_sync"):
        # The engine takes calls in order: a generation begun early finishes first, from
        # the weights it started with.
        ctx.rollout.sync_from(ctx.actor)
    ctx.policy_version += 1


def length_metrics(teacher: Sequences, samples: Sequences | None) -> dict:
    """Response lengths, and the token counts the throughput figures are made of."""
    def tokens(seqs: Sequences) -> int:
        return sum(len(p) + len(r) for p, r in zip(seqs.prompts, seqs.responses))

    out = {"g/teacher_len_mean": float(np.mean([len(r) for r in teacher.responses])),
           "perf/step_tokens": float(tokens(teacher) + (tokens(samples) if samples else 0))}
    if samples is not None:
        lens = [len(r) for r in samples.responses]
        out.update({"g/response_len_mean": float(np.mean(lens)),
                    "g/response_len_max": float(np.max(lens)),
                    "perf/generated_tokens": float(sum(lens))})
    return out


def add_throughput(metrics: dict) -> dict:
    """Tokens per second of the whole step (every teacher and sample sequence, prompt
    included) and of generation alone, from the counts and the phase times."""
    if metrics.get("time/step"):
        metrics["perf/tokens_per_s"] = metrics["perf/step_tokens"] / metrics["time/step"]
    if metrics.get("time/rollout") and "perf/generated_tokens" in metrics:
        metrics["perf/rollout_tokens_per_s"] = (metrics["perf/generated_tokens"]
                                                / metrics["time/rollout"])
    return metrics


def d_only_step(ctx: StepContext, batch, step: int) -> tuple[dict, Sequences, Sequences]:
    """Samples, D's scores of them (metrics), D's BT update; G untouched. Also returns the
    teacher and sample sequences for what the caller does next."""
    teacher = teacher_sequences(batch)
    samples, staleness = sample(ctx, batch, step)
    t, s, metrics = score(ctx, teacher, samples)
    metrics.update(judge_samples(ctx, t, samples, s)[1])
    metrics["rollout/staleness"] = float(staleness)
    metrics.update(update_discriminator(ctx, teacher, samples, step))
    metrics.update(length_metrics(teacher, samples))
    return metrics, teacher, samples


def warmup_step(ctx: StepContext, batch, step: int) -> dict:
    """D by BT every step; G by SFT on teacher answers once step >= d_only_steps."""
    metrics, teacher, _ = d_only_step(ctx, batch, step)
    if step >= ctx.cfg.train.d_only_steps:
        metrics.update(sft_update(ctx, teacher))
        sync_rollout(ctx)
    return metrics


def seqkd_step(ctx: StepContext, batch, step: int) -> dict:
    """The SFT-only baseline: no samples, no discriminator."""
    teacher = teacher_sequences(batch)
    metrics = sft_update(ctx, teacher)
    metrics.update(length_metrics(teacher, None))
    return metrics


def _global_norm(samples: Sequences, agg: str) -> float:
    if agg == "token-mean":
        return float(samples.response_tokens())
    return float(sum(1 for r in samples.responses if len(r)))


def gad_step(ctx: StepContext, batch, step: int) -> dict:
    """G by the clipped policy loss with reward = D's pre-update score; D by BT. The first
    train.gad_d_only_steps steps train D alone."""
    cfg = ctx.cfg
    if step < cfg.train.gad_d_only_steps:
        return d_only_step(ctx, batch, step)[0]
    teacher = teacher_sequences(batch)
    samples, staleness = sample(ctx, batch, step)
    with ctx.phase("logprobs"):
        # Three forward passes that need nothing of each other: on separate devices the
        # reference and D run while the actor computes its log-probs (colocated roles take
        # turns). time/score is then only the wait for D after the log-probs.
        ref_pending = ctx.ref.start_map("logprobs", samples, cfg.rollout.temperature)
        scores_pending = start_scores(ctx, teacher, samples)
        old = ctx.actor.map_sequences("logprobs", samples, cfg.rollout.temperature)
        ref = ref_pending.result()
    t, d_scores, metrics = score(ctx, teacher, samples, scores_pending)
    accepted, judged = judge_samples(ctx, t, samples, d_scores)
    metrics.update(judged, **{"rollout/staleness": float(staleness)})
    # reward.source=task: the acceptance test's verdict (the RL side's upper bound).
    rewards = accepted.astype(np.float32) if cfg.reward.source == "task" else d_scores
    adv = alg.grpo_advantages(torch.from_numpy(rewards), torch.tensor(samples.group))
    if cfg.discriminator.update_in_gad:  # False: D frozen after warmup (ablation)
        metrics.update(update_discriminator(ctx, teacher, samples, step))
    # As arrays: the policy update's shards then travel as buffers (Sequences.fields).
    samples.fields.update(advantage=adv.numpy(), old_logprobs=old, ref_logprobs=ref)
    with ctx.phase("g_update"):
        # ppo_epochs passes over the same samples, each in mini-batches of prompts (one
        # optimizer step each, normalised over its own mini-batch). After the first step the
        # ratio to the sampling policy departs from 1 and the clip takes effect. Metrics:
        # the mean over the last pass's steps; optimizer_steps counts all of them.
        parts = prompt_minibatches(samples, cfg.actor.mini_batch_prompts)
        for _ in range(cfg.actor.ppo_epochs):
            g = [ctx.actor.train("policy_step", p, _global_norm(p, cfg.actor.loss_agg),
                                 cfg.rollout.temperature) for p in parts]
    g_metrics = mean_metrics(g)
    if g_metrics:
        g_metrics["optimizer_steps"] = len(parts) * cfg.actor.ppo_epochs
    metrics.update({f"g/{k}": v for k, v in g_metrics.items()})
    metrics["g/reward_mean"] = float(rewards.mean())
    if ctx.monitor is not None:
        with ctx.phase("monitor"):
            frozen = np.asarray(ctx.monitor.map_sequences("scores", samples), dtype=np.float64)
        metrics["g/frozen_d_reward"] = float(frozen.mean())
    metrics["g/engine_logprob_max_diff"] = _max_diff(samples.fields["engine_logprobs"], old)
    metrics["g/ref_logprob_max_diff"] = _max_diff(ref, old)
    sync_rollout(ctx)
    metrics.update(length_metrics(teacher, samples))
    return metrics


def _max_diff(a, b) -> float:
    diffs = [np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
             for x, y in zip(a, b) if len(x)]
    return float(max(diffs)) if diffs else 0.0


STEPS = {"warmup": warmup_step, "gad": gad_step, "seqkd": seqkd_step}
