"""Exact resume: 6 steps straight == 3 steps, stop, resume, 3 steps (bitwise per-step metrics),
for the warmup and the gad stage; and a save killed midway leaves the previous checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from gad_megatron.trainer.checkpoints import find_resume as resume_point
from gad_megatron.trainer.controller import train
from tests.tiny_models import small_run


def cfg_for(tmp_path, name, stage, *extra):
    return small_run(tmp_path, name, stage, "train.steps=6", "train.d_only_steps=2",
                     "train.save_every=3", "rollout.max_new_tokens=10", *extra)


def comparable(history):
    # Wall-clock figures (phase times, tokens per second) are the only things allowed to differ.
    return [{k: v for k, v in m.items() if not (k.startswith("time/") or k.endswith("_per_s"))}
            for m in history]


@pytest.mark.parametrize("stage", ["warmup", "gad"])
def test_stop_and_resume_is_bitwise_identical(tmp_path, stage):
    extra = []
    if stage == "gad":
        train(cfg_for(tmp_path, "warm", "warmup", "train.steps=3"), backend="inline")
        extra = [f"train.init_from={tmp_path / 'warm'}"]
    straight = train(cfg_for(tmp_path, "straight", stage, *extra), backend="inline")
    first = train(cfg_for(tmp_path, "resumed", stage, *extra), backend="inline", stop_after=3)
    assert resume_point(tmp_path / "resumed").name == "step_0000003"
    second = train(cfg_for(tmp_path, "resumed", stage, *extra), backend="inline")
    assert [m["step"] for m in second] == [3, 4, 5]
    assert comparable(first + second) == comparable(straight)
    logged = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(6))


def test_a_crashed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from gad_megatron.workers import discriminator

    cfg = cfg_for(tmp_path, "run", "warmup")
    train(cfg, backend="inline", stop_after=3)  # checkpoint at step 3
    real_save = discriminator.DiscriminatorWorker.save

    def crash(self, out_dir):  # the actor's part is written, then the process "dies"
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(discriminator.DiscriminatorWorker, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, backend="inline")  # runs steps 3..5, dies saving step 6
    assert resume_point(tmp_path / "run").name == "step_0000003"
    assert (tmp_path / "run" / "checkpoints" / ".step_0000006.partial" / "actor").exists()
    monkeypatch.setattr(discriminator.DiscriminatorWorker, "save", real_save)
    resumed = train(cfg, backend="inline")
    assert [m["step"] for m in resumed] == [3, 4, 5]
    assert resume_point(tmp_path / "run").name == "step_0000006"
    shutil.rmtree(tmp_path / "run")
