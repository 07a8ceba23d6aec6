"""`export`: the student loads in transformers with logits equal to the Megatron actor's, and
the discriminator loads as a sequence classifier with the same scores."""

from __future__ import annotations

import torch

from gad_megatron.__main__ import main
from gad_megatron.config import load_config
from gad_megatron.data.task import write_task
from gad_megatron.trainer.backends import start_inline
from gad_megatron.trainer.controller import train
from gad_megatron.trainer.setup import latest_checkpoint, resolve_inputs
from gad_megatron.workers.common import WeightsSource
from gad_megatron.workers.sequences import Sequences


def test_exported_student_and_discriminator_match_megatron(tmp_path):
    import transformers as tf

    write_task(tmp_path / "task", n_train=32, n_test=4, seed=0)
    cfg = load_config("configs/default.yaml", [
        f"run.out_dir={tmp_path / 'run'}", "train.steps=2", "train.d_only_steps=0",
        "train.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6",
        f"data.train_files={tmp_path / 'task' / 'train.jsonl'}", "model.tiny_hidden=32"])
    train(cfg, backend="inline")
    assert main(["export", "--run", str(tmp_path / "run"), "--discriminator"]) == 0
    student_dir = tmp_path / "run" / "export" / "student"
    disc_dir = tmp_path / "run" / "export" / "discriminator"

    # Megatron side: the trained checkpoint loaded back into workers (one rank, inline).
    ckpt = latest_checkpoint(str(tmp_path / "run"))
    inputs = resolve_inputs(cfg)
    inputs.actor = WeightsSource(str(ckpt / "actor"), inputs.arch_config)
    inputs.discriminator = WeightsSource(str(ckpt / "discriminator"), inputs.arch_config)
    roles = start_inline(cfg, inputs, total_steps=2)
    seq = [1, 5, 40, 41, 42, 3, 60, 61, 62]
    logp = roles.actor.map_sequences("logprobs", Sequences([seq[:5]], [seq[5:]]))[0]
    score = roles.disc.map_sequences("scores", Sequences([seq[:5]], [seq[5:]]))[0]

    student = tf.AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        ref = torch.log_softmax(student(input_ids=torch.tensor([seq])).logits[0].double(), -1)
    hf_logp = ref[4:-1].gather(-1, torch.tensor(seq[5:]).unsqueeze(-1)).squeeze(-1)
    assert (torch.from_numpy(logp).double() - hf_logp).abs().max() <= 1e-5

    disc = tf.AutoModelForSequenceClassification.from_pretrained(disc_dir).eval()
    with torch.no_grad():
        hf_score = disc(input_ids=torch.tensor([seq])).logits[0, 0].item()
    assert abs(hf_score - float(score)) <= 1e-5
