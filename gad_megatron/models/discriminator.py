"""The discriminator: the student's backbone with a scalar head instead of the LM head.

Built by composition: a Megatron GPTModel (same layer spec, same name table, same parallel
layouts as the student) whose `output_layer` submodule is swapped for `ScalarHead`. GPTModel's
forward then returns `[B, T, 1]` per-token scores instead of vocab logits; the sequence score
is read at the last valid token of `[prompt, response]`.
"""

from __future__ import annotations

import dataclasses

import torch

from gad_megatron.models.builder import BuildOptions, build_gpt
from gad_megatron.models.hf_config import HFArch

HEAD_PREFIX = "output_layer."


class ScalarHead(torch.nn.Module):
    """hidden [T, B, H] -> score [T, B, 1]; replicated on every TP rank (it is tiny).

    Called exactly like the ColumnParallelLinear it replaces, and returns (output, None).
    No bias: the Bradley-Terry loss only sees score differences, so a bias would never
    train; without it the head is exactly HF's `*ForSequenceClassification` `score` layer.
    """

    def __init__(self, config, init_std: float):
        super().__init__()
        self.sequence_parallel = bool(config.sequence_parallel)
        # Named `weight` directly (not a nested Linear): Megatron's language-model
        # checkpoint code looks for `output_layer.weight` on the last stage.
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size,
                                                     dtype=config.params_dtype))
        # A fresh, small head: initial scores are near 0 for every sequence, so the first
        # Bradley-Terry steps see an unsaturated sigmoid.
        with torch.no_grad():
            torch.nn.init.normal_(self.weight, std=init_std)

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import (
                gather_from_sequence_parallel_region)

            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        return torch.nn.functional.linear(hidden_states, self.weight), None


def build_discriminator(arch: HFArch, tp: int, pp: int, opts: BuildOptions = BuildOptions(),
                        head_init_std: float = 1e-3):
    """This rank's discriminator shard; the last pipeline stage carries the scalar head."""
    # Untied: the head replaces the LM output entirely, so nothing may share its weight.
    model = build_gpt(dataclasses.replace(arch, tie_word_embeddings=False), tp, pp, opts)
    if model.post_process:
        model.output_layer = ScalarHead(model.config, head_init_std)
        _sync_head_over_tp(model.output_layer)
    return model


def _sync_head_over_tp(head: ScalarHead) -> None:
    # The head is replicated, not split: every TP rank must start from the same values,
    # whatever each process's RNG did before.
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return
    src = ps.get_tensor_model_parallel_src_rank()
    for p in head.parameters():
        dist.broadcast(p.data, src=src, group=ps.get_tensor_model_parallel_group())


def score_micro_batches(model, micro_batches) -> list[torch.Tensor]:
    """Sequence scores [N] per micro-batch (padded or packed), on the last pipeline stage."""
    from gad_megatron.models.forward import run_schedule

    return run_schedule(model, micro_batches, micro_batch_scores)


def micro_batch_scores(out: torch.Tensor, mb) -> torch.Tensor:
    """[N] sequence scores of a micro-batch (padded or packed) from the head's output."""
    return last_valid_scores(mb.rows(out), mb.valid)


def load_student_weights(model, arch: HFArch, hf_dir) -> None:
    """Initialise the backbone from a student HF checkpoint; the head stays fresh."""
    from gad_megatron.checkpoint.hf_io import load_hf_weights

    load_hf_weights(model, arch, hf_dir, skip=(HEAD_PREFIX,))


def to_right_padding(tokens: torch.Tensor, valid: torch.Tensor):
    """Move each row's valid tokens to the front. tokens, valid: [B, T] -> same shapes.

    Megatron's RoPE positions are sequence indices, so a left-padded row would be rotated
    differently from the same row right-padded; scoring always uses right padding.
    """
    valid = valid.bool()
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid first, in order
    return tokens.gather(1, order), valid.gather(1, order)


def last_valid_scores(per_token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sequence scores from per-token scores. per_token: [B, T, 1] or [B, T]; valid: [B, T]
    right-padded. Returns [B] float32, read at each row's last valid token."""
    if per_token.dim() == 3:
        per_token = per_token.squeeze(-1)
    lengths = valid.long().sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("a row has no valid token to score")
    return per_token.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1).float()


@torch.no_grad()
def export_discriminator_tensors(model, arch: HFArch):
    """(hf_name, tensor) of the discriminator as HF `*ForSequenceClassification` (num_labels
    1): the backbone under the usual names plus `score.weight`. Collective, like the student's
    export; every rank receives the same sequence."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gad_megatron.checkpoint.hf_io import export_hf_tensors

    yield from export_hf_tensors(model, arch, skip=(HEAD_PREFIX,))
    head = model.output_layer.weight.detach().clone() if model.post_process else \
        torch.empty(1, arch.hidden_size, dtype=next(model.parameters()).dtype,
                    device=next(model.parameters()).device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        dist.broadcast(head, src=ranks[-1], group=ps.get_pipeline_model_parallel_group())
    yield "score.weight", head


def sequence_classification_config(arch: HFArch, pad_id: int) -> dict:
    """The HF config of the exported discriminator."""
    cfg = dict(arch.raw)
    cfg["architectures"] = [arch.architecture.replace("ForCausalLM", "ForSequenceClassification")]
    cfg.update(num_labels=1, id2label={"0": "score"}, label2id={"score": 0}, pad_token_id=pad_id)
    return cfg
