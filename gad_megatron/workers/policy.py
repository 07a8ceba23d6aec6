"""The student (ActorWorker) and the frozen reference (ReferenceWorker), one Megatron rank each.

Plain classes: a test drives them on gloo ranks, Ray places them on a cluster, torchrun runs
them on a GPU. Losses come from gad_megatron.algorithms, normalised by the *global* batch
(all micro-batches, all DP ranks), so the summed micro-batch losses are the global loss.
"""

from __future__ import annotations

import numpy as np
import torch

from gad_megatron import algorithms as alg
from gad_megatron.config.schema import ActorConfig, ReferenceConfig
from gad_megatron.models.builder import BuildOptions, build_gpt
from gad_megatron.models.forward import MicroBatch, run_schedule
from gad_megatron.models.logprobs import micro_batch_logprobs
from gad_megatron.models.perf import PerfConfig
from gad_megatron.workers import common
from gad_megatron.workers.sequences import Sequences, per_sequence, role_micro_batches


def _position_tensor(values: list, mb: MicroBatch, dtype=torch.float32) -> torch.Tensor:
    """Per-sequence response arrays -> [B, T] at the response positions (0 elsewhere)."""
    mask = mb.extra["resp_mask"]
    out = torch.zeros(mask.shape, dtype=dtype)
    for row, i in enumerate(mb.extra["index"]):
        # A copy: arrays that came through Ray's object store are read-only views.
        out[row][mask[row]] = torch.tensor(values[i], dtype=dtype)
    return out.to(mb.tokens.device)


def _row_tensor(values: list, mb: MicroBatch) -> torch.Tensor:
    """Per-sequence scalars -> [B]."""
    return torch.tensor([float(values[i]) for i in mb.extra["index"]], device=mb.tokens.device)


class PolicyModel:
    """A GPT shard that can compute response log-probs (shared by actor and reference)."""

    def __init__(self, source: common.WeightsSource, parallel, micro_batch_tokens: int,
                 pad_id: int, seed: int, perf: PerfConfig = PerfConfig()):
        common.start_rank(parallel, seed)
        self.arch = source.arch()
        self.parallel = parallel
        self.budget = micro_batch_tokens
        self.pad_id = pad_id
        self.perf = perf
        opts = BuildOptions(dtype=source.torch_dtype(), init_weights=False, perf=perf)
        self.model = common.to_device(build_gpt(self.arch, parallel.tp, parallel.pp, opts))
        common.load_into(self.model, source)

    def batches(self, seqs: Sequences) -> list[MicroBatch]:
        return role_micro_batches(seqs, self.budget, self.pad_id, self.perf, self.parallel.tp)

    def token_logprobs(self, logits: torch.Tensor, mb: MicroBatch, temperature: float,
                       with_entropy: bool = False):
        """Next-token log-probs (and entropies) in the row layout [N, L] of `mb`."""
        return micro_batch_logprobs(logits, mb, self.arch.vocab_size, temperature,
                                    with_entropy)

    @torch.no_grad()
    def logprobs(self, seqs: Sequences, temperature: float = 1.0) -> list[np.ndarray] | None:
        """Log-probs of each response token; returned by output ranks, None elsewhere."""
        self.model.eval()
        outs = run_schedule(self.model, self.batches(seqs),
                            lambda o, mb: per_sequence(self.token_logprobs(o, mb, temperature), mb))
        return [a for chunk in outs for a in chunk] if common.is_output_rank() else None


class ActorWorker:
    """The student: log-probs, SFT updates, policy updates, weight export."""

    def __init__(self, cfg: ActorConfig, source: common.WeightsSource, pad_id: int,
                 seed: int = 1234, total_steps: int = 1000):
        from gad_megatron.models.optim import wrap_for_training

        self.cfg = cfg
        self.policy = PolicyModel(source, cfg.parallel, cfg.micro_batch_tokens, pad_id, seed,
                                  cfg.perf)
        self.model, self.optimizer, self.scheduler = wrap_for_training(
            self.policy.model, cfg.optim, total_steps=total_steps, perf=cfg.perf)
        self.policy.model = self.model  # forward through the DDP wrapper from now on
        self.residency = common.Residency()

    def pid(self) -> int:
        return common.pid()

    def offload(self) -> int:
        """Weights, gradients and optimizer state to host memory (colocated runs)."""
        return self.residency.offload(self.model, self.optimizer)

    def reload(self, weights_only: bool = False) -> None:
        self.residency.reload(weights_only)

    def logprobs(self, seqs: Sequences, temperature: float = 1.0):
        return self.policy.logprobs(seqs, temperature)

    def _train(self, seqs: Sequences, loss_fn) -> dict:
        from gad_megatron.models.optim import train_step

        self.model.train()
        metrics = train_step(self.model, self.optimizer, self.scheduler,
                             self.policy.batches(seqs), loss_fn)
        return metrics if common.is_output_rank() else {}

    def sft_step(self, seqs: Sequences, global_tokens: int) -> dict:
        """Cross-entropy on the response tokens (teacher answers), token-mean over the batch."""
        def loss_fn(logits, mb):
            mask = mb.extra["resp_mask"]
            logp = self.policy.token_logprobs(logits, mb, 1.0)
            loss = alg.sft_loss(logp, mask, "token-mean", global_normalizer=global_tokens)
            return loss, mask.sum(), {"sft_loss": loss.detach()}

        return self._train(seqs, loss_fn)

    def policy_step(self, seqs: Sequences, global_norm: float, temperature: float) -> dict:
        """Clipped policy loss with GRPO advantages, plus the KL loss to the reference.

        `seqs.fields` holds per sequence: 'advantage', 'old_logprobs', 'ref_logprobs'.
        `global_norm` is the aggregation denominator over the whole global batch.
        """
        cfg = self.cfg

        def loss_fn(logits, mb):
            mask = mb.extra["resp_mask"]
            logp, entropy = self.policy.token_logprobs(logits, mb, temperature, True)
            old = _position_tensor(seqs.fields["old_logprobs"], mb)
            ref = _position_tensor(seqs.fields["ref_logprobs"], mb)
            adv = _row_tensor(seqs.fields["advantage"], mb)
            pg, stats = alg.policy_loss(logp, old, adv, mask, cfg.policy_loss, cfg.clip_low,
                                        cfg.clip_high, cfg.loss_agg, dual_clip=cfg.dual_clip,
                                        global_normalizer=global_norm)
            kl = alg.aggregate(alg.kl_estimate(logp, ref, cfg.kl_kind), mask, cfg.loss_agg,
                               global_normalizer=global_norm)
            ent = alg.aggregate(entropy.detach(), mask, cfg.loss_agg, global_normalizer=global_norm)
            share = mask.sum().float() / max(float(seqs.response_tokens()), 1.0)
            metrics = {"pg_loss": pg.detach(), "kl": kl.detach(), "entropy": ent,
                       "clip_frac": share * stats["clip_frac"],
                       "ratio_mean": share * stats["ratio_mean"]}
            return pg + cfg.kl_coef * kl, mask.sum(), metrics

        return self._train(seqs, loss_fn)

    def sync_weights(self, transport, bucket_bytes: int) -> None:
        """Stream HF-named weights to a rollout engine (collective over this role)."""
        from gad_megatron.resharding.execute import sync_weights

        sync_weights(self._bare(), self.policy.arch, transport, bucket_bytes)

    # ---- the weight group to a rollout engine in another process (the Ray backend)
    def open_weight_port(self) -> tuple[str, int] | None:
        """(address, free port) for a weight group on the sending rank; None elsewhere.
        The sender (TP 0, PP 0, DP 0) is global rank 0, whose address is MASTER_ADDR."""
        import os

        from gad_megatron.parallel.launch import free_port
        from gad_megatron.resharding.execute import is_sender

        if not is_sender():
            return None
        addr = os.environ["MASTER_ADDR"]
        return addr, free_port(addr)

    def join_weight_group(self, addr: str, port: int, world: int, backend: str,
                          timeout_s: float) -> None:
        """The sending rank joins as rank 0 (collective with the engine's receivers)."""
        from gad_megatron.resharding.execute import is_sender
        from gad_megatron.resharding.weight_group import WeightGroup

        if is_sender():
            self._weight_group = WeightGroup(addr, port, world, 0, backend, timeout_s)

    def sync_weights_to_group(self, bucket_bytes: int) -> None:
        """`sync_weights` over the joined weight group (collective over this role and the
        engine's receivers)."""
        from gad_megatron.resharding.broadcast import GroupTransport
        from gad_megatron.resharding.execute import is_sender

        transport = GroupTransport(self._weight_group) if is_sender() else None
        self.sync_weights(transport, bucket_bytes)

    def export_hf(self, out_dir: str, tokenizer_src: str | None = None) -> None:
        import torch.distributed as dist

        from gad_megatron.checkpoint.hf_io import export_hf_tensors, save_hf_dir

        save_hf_dir(export_hf_tensors(self._bare(), self.policy.arch), self.policy.arch,
                    out_dir, tokenizer_src=tokenizer_src, write=dist.get_rank() == 0)

    def save(self, out_dir: str, tokenizer_src: str | None = None) -> None:
        """Model, optimizer, scheduler and RNG (collective over this role)."""
        from gad_megatron.checkpoint.megatron_ckpt import save_training_state

        p = self.cfg.parallel
        common.check_finite_weights(self._bare(), "actor")
        save_training_state(self._bare(), self.optimizer, self.scheduler, self.policy.arch,
                            out_dir, p.tp, p.pp, tokenizer_src)

    def load(self, ckpt_dir: str) -> None:
        """Resume: restore what `save` wrote (collective)."""
        from gad_megatron.checkpoint.megatron_ckpt import load_training_state

        load_training_state(self._bare(), self.optimizer, self.scheduler, ckpt_dir)

    def weight_norm(self) -> float:
        """Sum of squared weights of this shard (tests check that an update happened)."""
        return float(sum(p.detach().double().pow(2).sum() for p in self._bare().parameters()))

    def _bare(self):
        return self.policy.model.module if hasattr(self.policy.model, "module") \
            else self.policy.model


class ReferenceWorker:
    """The frozen reference policy: log-probs only."""

    def __init__(self, cfg: ReferenceConfig, source: common.WeightsSource, pad_id: int,
                 seed: int = 1234):
        self.policy = PolicyModel(source, cfg.parallel, cfg.micro_batch_tokens, pad_id, seed,
                                  cfg.perf)
        for p in self.policy.model.parameters():
            p.requires_grad_(False)
        self.residency = common.Residency()

    def pid(self) -> int:
        return common.pid()

    def offload(self) -> int:
        """Weights to host memory (colocated runs)."""
        return self.residency.offload(self.policy.model)

    def reload(self, weights_only: bool = False) -> None:
        self.residency.reload(weights_only)

    def logprobs(self, seqs: Sequences, temperature: float = 1.0):
        return self.policy.logprobs(seqs, temperature)
