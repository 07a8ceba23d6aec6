"""Issue 20's measurement and levers, by hand: D's oracle AUC and teacher-vs-accepted gap,
the styles task's verdict on rendered prompts, the teacher-text negatives, and the task
reward reaching GRPO."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gad_megatron.algorithms import oracle_auc, oracle_metrics, teacher_vs_accepted_gap
from gad_megatron.data import negatives as neg


def test_oracle_auc_by_hand():
    # accepted 0.9, 0.5 vs rejected 0.1, 0.5: (0.9>0.1) (0.9>0.5) (0.5>0.1) win, (0.5=0.5)
    # a tie (half): 3.5 of 4 pairs.
    scores = torch.tensor([0.9, 0.1, 0.5, 0.5])
    accepted = torch.tensor([True, False, True, False])
    assert oracle_auc(scores, accepted) == pytest.approx(0.875)
    assert oracle_auc(-scores, accepted) == pytest.approx(0.125)  # D ranks them backwards
    assert oracle_auc(scores, torch.ones(4, dtype=torch.bool)) is None  # no rejected one
    assert oracle_auc(scores, torch.zeros(4, dtype=torch.bool)) is None  # no accepted one
    with pytest.raises(ValueError, match="same 1-D shape"):
        oracle_auc(scores, accepted[:3])


def test_teacher_vs_accepted_gap_by_hand_and_the_undefined_figures_are_left_out():
    teacher = torch.tensor([1.0, 2.0])  # mean 1.5
    samples = torch.tensor([0.9, 0.1, 0.5, 0.5])
    accepted = torch.tensor([True, False, True, False])  # accepted mean 0.7
    assert teacher_vs_accepted_gap(teacher, samples, accepted) == pytest.approx(0.8)
    none = torch.zeros(4, dtype=torch.bool)
    assert teacher_vs_accepted_gap(teacher, samples, none) is None
    assert oracle_metrics(teacher, samples, accepted) == pytest.approx(
        {"accept_rate": 0.5, "oracle_auc": 0.875, "teacher_vs_accepted_gap": 0.8})
    assert oracle_metrics(teacher, samples, none) == {"accept_rate": 0.0}  # not 0.5, not 0


def test_the_in_group_auc_by_hand():
    from gad_megatron.algorithms import grouped_oracle_auc

    # group 0: accepted 0.2 vs rejected 0.1, 0.3 -> 1 of 2 pairs; group 1: accepted 0.9 vs
    # rejected 0.5 -> 1 of 1; group 2: only accepted (undefined, left out). Mean 0.75.
    scores = torch.tensor([0.2, 0.1, 0.3, 0.9, 0.5, 0.7])
    accepted = torch.tensor([True, False, False, True, False, True])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    assert grouped_oracle_auc(scores, accepted, group) == pytest.approx(0.75)
    # pooled: accepted 0.2, 0.9, 0.7 vs rejected 0.1, 0.3, 0.5: 0.2 beats 1, 0.9 and 0.7
    # beat 3 each: 7 of 9
    assert oracle_auc(scores, accepted) == pytest.approx(7 / 9)
    assert grouped_oracle_auc(scores, accepted.logical_not() & False, group) is None


def test_the_styles_verdict_on_rendered_prompts_and_decoded_answers():
    from gad_megatron.data import eos_id, load_tokenizer
    from gad_megatron.data.encode import ALPACA_TEMPLATE
    from gad_megatron.data.task_judge import TaskJudge

    tok = load_tokenizer("builtin")
    eos = eos_id(tok)
    prompt = "give even numbers from 10 to 20"
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    rendered = [tok(text, add_special_tokens=False)["input_ids"]
                for text in (chat, ALPACA_TEMPLATE.format(prompt=prompt))]
    answers = ["Two picks: 14 and 16.", "Two picks: 14 and 15.", "[2] 12; 12", "[1] 18"]
    ids = [tok(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    judge = TaskJudge("styles", tok, eos)
    for p in rendered:  # both templates: the prompt is found inside the rendering
        verdict = judge([np.asarray(p)] * 4, [np.asarray(r) for r in ids])
        assert verdict.tolist() == [True, False, False, True]  # 15 is odd; 12 twice
    with pytest.raises(ValueError, match="no acceptance test"):
        TaskJudge("nosuch", tok, eos)


class Drawn:
    """A generator that hands out the given draws in order (hand-worked negatives)."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def integers(self, lo, hi=None):
        value = self.draws.pop(0)
        assert (0 if hi is None else lo) <= value < (lo if hi is None else hi)
        return value

    def choice(self, n, size, replace):
        return np.asarray(self.draws.pop(0))


EOS = 9


def test_splice_truncate_and_swap_by_hand():
    a, b = np.array([1, 2, 3, 4, EOS]), np.array([5, 6, 7, EOS])
    assert neg.splice(a, b, Drawn(2, 1), EOS).tolist() == [1, 2, 6, 7, EOS]  # a[:2] + b[1:]
    assert neg.splice(a, a, Drawn(3, 1), EOS).tolist() == [1, 2, 3, 2, 3, 4, EOS]
    assert neg.truncate(a, Drawn(1), EOS).tolist() == [1, EOS]
    # spans [0, 1) and [2, 4) of 1 2 3 4 exchanged around the middle [1, 2)
    assert neg.swap_spans(a, Drawn([0, 1, 2, 4]), EOS).tolist() == [3, 4, 2, 1, EOS]
    assert neg.swap_spans(np.array([1, 2, EOS]), Drawn(), EOS).tolist() == [2, 1, EOS]
    one = np.array([1, EOS])  # nothing to cut: returned as is (then dropped as identical)
    assert neg.truncate(one, Drawn(), EOS) is one


def test_make_negatives_pairs_each_with_its_prompt_and_drops_copies():
    prompts = [np.array([100]), np.array([101]), np.array([100])]
    answers = [np.array([1, 2, 3, EOS]), np.array([5, 6, 7, EOS]), np.array([1, 2, 3, EOS])]
    # prompt 0 gets prompt 1's answer (h = 0 -> 1); prompt 1 gets 0's (h = 0); prompt 2's
    # draw (h = 0) is prompt 0, the same prompt text: skipped, it would be a right answer.
    out, group = neg.make_negatives(prompts, answers, ["mismatch"], 1, Drawn(0, 0, 0), EOS)
    assert group == [0, 1] and [o.tolist() for o in out] == [[5, 6, 7, EOS], [1, 2, 3, EOS]]
    # splice with a partner equal to the answer at the same cut: a copy, dropped.
    out, group = neg.make_negatives(prompts[:1], answers[:1], ["splice"], 1, Drawn(1, 1),
                                    EOS, partners=[[]])
    assert out == [] and group == []
    with pytest.raises(ValueError, match="unknown negative kinds"):
        neg.make_negatives(prompts, answers, ["shuffle"], 1, Drawn(), EOS)


def test_teacher_pool_gives_the_other_answers_of_the_same_prompt():
    from gad_megatron.data.dataset import TokenDataset

    pt = np.array([7, 7, 8, 7, 7], np.int32)  # prompts: [7 7], [8], [7 7]
    tt = np.array([1, EOS, 2, EOS, 3, EOS], np.int32)
    ds = TokenDataset(["a", "b", "c"], pt, np.array([0, 2, 3, 5]), tt, np.array([0, 2, 4, 6]))
    pool = neg.TeacherPool(ds)
    assert [x.tolist() for x in pool.others(np.array([7, 7]), np.array([1, EOS]))] == [[3, EOS]]
    assert pool.others(np.array([8]), np.array([2, EOS])) == []


def test_config_refuses_a_task_reward_without_a_task_and_unknown_negatives():
    from gad_megatron.config import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match="reward.task"):
        load_config("configs/default.yaml", ["reward.source=task"])
    with pytest.raises((ConfigError, ValueError), match="negatives"):
        load_config("configs/default.yaml", ["discriminator.negatives=splice,shuffle"])
    cfg = load_config("configs/default.yaml", ["reward.task=styles", "reward.source=task",
                                               "discriminator.negatives=splice,mismatch"])
    assert cfg.discriminator.negatives == ("splice", "mismatch")


def test_a_discriminator_of_its_own_shape_and_its_refusals(tmp_path):
    from gad_megatron.config import ConfigError, load_config
    from gad_megatron.models.hf_config import parse_hf_config
    from gad_megatron.trainer.setup import resolve_inputs
    from tests.tiny_models import small_run

    cfg = small_run(tmp_path, "run", "warmup", "discriminator.tiny_layers=3",
                    "discriminator.tiny_hidden=48")
    inputs = resolve_inputs(cfg)
    d, g = parse_hf_config(inputs.discriminator.arch_config), parse_hf_config(inputs.arch_config)
    assert (d.num_layers, d.hidden_size) == (3, 48) and (g.num_layers, g.hidden_size) == (2, 32)
    assert d.vocab_size == g.vocab_size  # one tokenizer for both
    with pytest.raises((ConfigError, ValueError), match="do not fit a D of another shape"):
        load_config("configs/default.yaml", ["discriminator.tiny_hidden=128",
                                             "discriminator.init_from_actor=true"])
    with pytest.raises((ConfigError, ValueError), match="embedded default"):
        load_config("configs/default.yaml", ["discriminator.tiny_layers=4",
                                             "model.hf_path=/nonexistent"])


def _styles_cfg(tmp_path, name, config, *extra):
    from gad_megatron.config import load_config
    from gad_megatron.data.styles_task import write_styles_task

    task = tmp_path / "task"
    if not (task / "train.jsonl").exists():
        write_styles_task(task, n_train=48, n_test=4, n_ood=4)
    return load_config(config, [
        f"run.out_dir={tmp_path / name}", "train.prompts_per_step=4", "train.save_every=0",
        f"data.train_files={task / 'train.jsonl'}", "rollout.n=2", "model.tiny_hidden=32",
        "rollout.max_new_tokens=10", "tracking.enabled=false", "reward.task=styles", *extra])


def test_task_reward_d_from_the_student_and_d_only_gad_steps(tmp_path, monkeypatch):
    """reward.source=task: GRPO gets the acceptance verdicts; init_from_actor: D starts from
    the student's backbone with a fresh head; gad_d_only_steps: G waits."""
    from gad_megatron.trainer import steps as steps_mod
    from gad_megatron.trainer.controller import train

    train(_styles_cfg(tmp_path, "warmup", "configs/default.yaml", "train.steps=2",
                      "train.d_only_steps=1", "discriminator.negatives=splice,mismatch"),
          backend="inline")
    seen = []
    real = steps_mod.alg.grpo_advantages
    monkeypatch.setattr(steps_mod.alg, "grpo_advantages",
                        lambda rewards, group, *a, **k: seen.append(rewards.clone())
                        or real(rewards, group, *a, **k))
    history = train(_styles_cfg(
        tmp_path, "gad", "configs/default_gad.yaml", "train.steps=2",
        f"train.init_from={tmp_path / 'warmup'}", "reward.source=task",
        "discriminator.init_from_actor=true", "train.gad_d_only_steps=1"), backend="inline")
    d_only, rl = history
    assert "g/pg_loss" not in d_only and "d/d_loss" in d_only  # step 0: D alone
    # A fresh head (std 1e-3) over the student's backbone: scores near 0 at the first step.
    assert abs(d_only["d/teacher_score_mean"]) < 0.05
    assert len(seen) == 1 and set(seen[0].tolist()) <= {0.0, 1.0}  # verdicts as rewards
    assert rl["g/reward_mean"] == pytest.approx(rl["task/accept_rate"])
    assert rl["g/reward_mean"] == pytest.approx(float(seen[0].mean()))


def test_a_log_ratio_discriminator_starts_at_zero_and_learns_the_pair(tmp_path):
    """kind=log_ratio: every score is exactly 0 while D equals its frozen start; one BT
    step (Adam's first step moves each weight against its gradient's sign) opens the
    teacher-sample gap; the frozen start does not move."""
    import dataclasses

    from gad_megatron.config.schema import DiscriminatorConfig
    from gad_megatron.models.optim import OptimConfig
    from gad_megatron.workers.common import WeightsSource
    from gad_megatron.workers.discriminator import DiscriminatorWorker
    from gad_megatron.workers.sequences import Sequences
    from tests.tiny_models import make_hf_model

    hf = make_hf_model("qwen3", tmp_path / "hf")
    source = WeightsSource(str(hf), json.loads((hf / "config.json").read_text()))
    cfg = DiscriminatorConfig(kind="log_ratio", log_ratio_beta=0.5,
                              optim=OptimConfig(lr=1e-3, clip_grad=1.0))
    d = DiscriminatorWorker(dataclasses.replace(cfg, init_from_actor=True), source, pad_id=0,
                            eos_id=2)
    prompt, teacher, sample = [5, 6, 7], [10, 11, 12, 2], [20, 21, 2]
    pairs = Sequences([prompt, prompt], [teacher, sample], [0, 0],
                      {"is_teacher": np.array([True, False])})
    assert d.scores(pairs).tolist() == [0.0, 0.0]
    frozen = [p.detach().clone() for p in d.scorer.frozen.parameters()]
    d.bt_step(pairs, 1)
    t, s = d.scores(pairs)
    assert t - s > 0
    assert all(torch.equal(a, b) for a, b in zip(frozen, d.scorer.frozen.parameters()))
