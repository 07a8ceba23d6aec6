"""The discriminator rank: sequence scores, and the Bradley-Terry update on (teacher, sample)
pairs. Teacher answers and student samples go through exactly the same scoring path.

How a sequence is scored is a part of its own (composition, `discriminator.kind`):
`HeadScore` reads the scalar head at the last valid token (the paper); `LogRatioScore` keeps
the LM head and scores beta * sum of log pi_D - log pi_0 over the response tokens, pi_0 a
frozen copy of the starting weights on this rank."""

from __future__ import annotations

import numpy as np
import torch

from gad_megatron import algorithms as alg
from gad_megatron.config.schema import DiscriminatorConfig
from gad_megatron.models.builder import BuildOptions, build_gpt
from gad_megatron.models.discriminator import (
    HEAD_PREFIX, build_discriminator, micro_batch_scores)
from gad_megatron.models.forward import MicroBatch, run_schedule
from gad_megatron.models.logprobs import micro_batch_logprobs
from gad_megatron.workers import common
from gad_megatron.workers.sequences import Sequences, role_micro_batches


KIND_FILE = "discriminator_kind.txt"
"""Written into a checkpoint of a D that is not the scalar-head kind."""


def strip_trailing_eos(seqs: Sequences, eos_id: int) -> Sequences:
    """The same sequences with one trailing EOS removed from each response that has one."""
    responses = [r[:-1] if len(r) > 1 and r[-1] == eos_id else r for r in seqs.responses]
    return Sequences(seqs.prompts, responses, seqs.group, seqs.fields)


class HeadScore:
    """The paper's D: the scalar head's output at each sequence's last valid token."""

    def prepare(self, batches: list[MicroBatch]) -> None:
        return None

    def rows(self, out: torch.Tensor, mb: MicroBatch, prepared) -> torch.Tensor:
        return micro_batch_scores(out, mb)  # [B]


def response_logprob_sums(logits: torch.Tensor, mb: MicroBatch, vocab_size: int
                          ) -> torch.Tensor:
    """[B] sum of each row's response-token log-probs (temperature 1)."""
    logp = micro_batch_logprobs(logits, mb, vocab_size, 1.0)  # [B, L]
    return torch.where(mb.extra["resp_mask"], logp, torch.zeros_like(logp)).sum(dim=1)


class LogRatioScore:
    """beta * (log pi_D(response) - log pi_0(response)), pi_0 the frozen starting weights:
    0 for every sequence before the first update, then above 0 for what D learned to find
    more likely than it did at the start. The frozen sums are computed once per call."""

    def __init__(self, frozen, vocab_size: int, beta: float):
        self.frozen, self.vocab, self.beta = frozen, vocab_size, beta

    @torch.no_grad()
    def prepare(self, batches: list[MicroBatch]) -> dict[int, torch.Tensor]:
        self.frozen.eval()
        outs = run_schedule(self.frozen, batches,
                            lambda o, mb: response_logprob_sums(o, mb, self.vocab))
        return {i: sums[row] for mb, sums in zip(batches, outs)
                for row, i in enumerate(mb.extra["index"])}

    def rows(self, out: torch.Tensor, mb: MicroBatch, prepared) -> torch.Tensor:
        ref = torch.stack([prepared[i] for i in mb.extra["index"]])
        return self.beta * (response_logprob_sums(out, mb, self.vocab) - ref)


def _build(cfg: DiscriminatorConfig, arch, source: common.WeightsSource, opts: BuildOptions):
    """(model, scorer) of `cfg.kind`, loaded from `source`."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if cfg.kind == "log_ratio":
        model = common.to_device(build_gpt(arch, tp, pp, opts))
        common.load_into(model, source)
        frozen = common.to_device(build_gpt(arch, tp, pp, opts))
        frozen.load_state_dict(model.state_dict())  # the same start, read from disk once
        frozen.requires_grad_(False)
        return model, LogRatioScore(frozen, arch.vocab_size, cfg.log_ratio_beta)
    model = common.to_device(build_discriminator(arch, tp, pp, opts, cfg.head_init_std))
    common.load_into(model, source, skip=(HEAD_PREFIX,))
    return model, HeadScore()


class DiscriminatorWorker:
    """One rank of the discriminator role."""

    def __init__(self, cfg: DiscriminatorConfig, source: common.WeightsSource, pad_id: int,
                 eos_id: int, seed: int = 1234, total_steps: int = 1000):
        from gad_megatron.models.optim import wrap_for_training

        common.start_rank(cfg.parallel, seed)
        self.cfg, self.pad_id, self.eos_id = cfg, pad_id, eos_id
        self.arch = source.arch()
        opts = BuildOptions(dtype=source.torch_dtype(), init_weights=False, perf=cfg.perf)
        model, self.scorer = _build(cfg, self.arch, source, opts)
        self.model, self.optimizer, self.scheduler = wrap_for_training(
            model, cfg.optim, total_steps=total_steps, perf=cfg.perf)
        self.residency = common.Residency()

    def pid(self) -> int:
        return common.pid()

    def offload(self) -> int:
        """Weights, gradients and optimizer state to host memory (colocated runs)."""
        return self.residency.offload(self.model, self.optimizer)

    def reload(self, weights_only: bool = False) -> None:
        self.residency.reload(weights_only)

    def _prepare(self, seqs: Sequences) -> Sequences:
        return seqs if self.cfg.score_eos else strip_trailing_eos(seqs, self.eos_id)

    def _batches(self, seqs: Sequences, keep_groups: bool) -> list[MicroBatch]:
        return role_micro_batches(seqs, self.cfg.micro_batch_tokens, self.pad_id,
                                  self.cfg.perf, self.cfg.parallel.tp, keep_groups)

    @torch.no_grad()
    def scores(self, seqs: Sequences) -> np.ndarray | None:
        """One score per sequence; identical sequences are scored once and share the score."""
        seqs = self._prepare(seqs)
        keys = [(p.tobytes(), r.tobytes()) for p, r in zip(seqs.prompts, seqs.responses)]
        first: dict[tuple, int] = {}  # key -> position among the unique sequences
        index: list[int] = []  # unique position -> first sequence with that key
        for i, k in enumerate(keys):
            if k not in first:
                first[k] = len(index)
                index.append(i)
        self.model.eval()
        batches = self._batches(seqs.take(index), False)
        prepared = self.scorer.prepare(batches)
        outs = run_schedule(self.model, batches,
                            lambda o, mb: self.scorer.rows(o, mb, prepared).detach())
        if not common.is_output_rank():
            return None
        uniq_scores = np.concatenate([o.cpu().numpy() for o in outs])
        return np.array([uniq_scores[first[k]] for k in keys], dtype=np.float32)

    def bt_step(self, seqs: Sequences, global_pairs: int) -> dict:
        """One BT update. `seqs` is group-ordered: each group's teacher answer (field
        'is_teacher' True) and its student samples; each sample pairs with its teacher."""
        from gad_megatron.models.optim import train_step

        cfg = self.cfg
        seqs = self._prepare(seqs)
        batches = self._batches(seqs, keep_groups=True)
        prepared = self.scorer.prepare(batches)
        self.model.train()

        def loss_fn(out, mb):
            rows = self.scorer.rows(out, mb, prepared)  # [B]
            t, s, same = _pairs(rows, mb, seqs)
            n = t.shape[0]
            loss = (bt_loss(cfg, t, s) if n else rows.sum() * 0.0) * (n / global_pairs)
            return loss, torch.tensor(n), {"d_loss": loss.detach()}

        metrics = train_step(self.model, self.optimizer, self.scheduler, batches, loss_fn)
        return metrics if common.is_output_rank() else {}

    def _bare(self):
        return self.model.module if hasattr(self.model, "module") else self.model

    def save(self, out_dir: str) -> None:
        """Model, optimizer, scheduler and RNG (collective over this role)."""
        from gad_megatron.checkpoint.megatron_ckpt import save_training_state

        p = self.cfg.parallel
        common.check_finite_weights(self._bare(), "discriminator")
        save_training_state(self._bare(), self.optimizer, self.scheduler, self.arch, out_dir,
                            p.tp, p.pp)
        if self.cfg.kind != "scalar_head" and torch.distributed.get_rank() == 0:
            # Said beside the weights: a log-ratio D is a language model plus the frozen
            # start it is measured against, which the export and evaluation refuse.
            from pathlib import Path

            (Path(out_dir) / KIND_FILE).write_text(self.cfg.kind + "\n")

    def load(self, ckpt_dir: str) -> None:
        """Resume: restore what `save` wrote (collective)."""
        from gad_megatron.checkpoint.megatron_ckpt import load_training_state

        load_training_state(self._bare(), self.optimizer, self.scheduler, ckpt_dir)


def bt_loss(cfg: DiscriminatorConfig, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The configured BT loss (with its remedies) of one micro-batch's pairs [B]."""
    adaptive = ((cfg.adaptive_temp_scale, cfg.adaptive_temp_min, cfg.adaptive_temp_max)
                if cfg.adaptive_temperature else None)
    return alg.discriminator_loss(
        t, s, temperature=cfg.bt_temperature, margin=cfg.bt_margin,
        normalize=cfg.normalize_scores, normalize_eps=cfg.normalize_eps, adaptive=adaptive,
        reg_weight=cfg.score_reg_weight, reg_threshold=cfg.score_reg_threshold)


def _pairs(rows: torch.Tensor, mb: MicroBatch, seqs: Sequences):
    """(teacher score, sample score, identical) per student row of the micro-batch.

    A sample whose tokens equal its teacher answer's gets the teacher's score *tensor*, so the
    pair's gap is exactly 0 and contributes no gradient: D cannot tell identical answers apart.
    """
    index = mb.extra["index"]
    teacher_row: dict[int, int] = {}
    for row, i in enumerate(index):
        if seqs.fields["is_teacher"][i]:
            teacher_row[seqs.group[i]] = row
    t_list, s_list, same = [], [], []
    for row, i in enumerate(index):
        if seqs.fields["is_teacher"][i]:
            continue
        tr = teacher_row[seqs.group[i]]
        ti = index[tr]
        identical = (np.array_equal(seqs.responses[i], seqs.responses[ti])
                     and np.array_equal(seqs.prompts[i], seqs.prompts[ti]))
        t_list.append(rows[tr])
        s_list.append(rows[tr] if identical else rows[row])
        same.append(identical)
    if not t_list:
        return rows[:0], rows[:0], []
    return torch.stack(t_list), torch.stack(s_list), same
