"""A trained discriminator checkpoint as the `scores(prompts, responses)` object `evaluate`
takes: the training worker itself, run inline (one rank in this process), so evaluation
scores go through exactly the code path (and EOS handling) that training used."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class WorkerDiscriminator:
    """Scores with a `DiscriminatorWorker` loaded from a project checkpoint directory."""

    def __init__(self, ckpt_dir: str | Path, pad_id: int, eos_id: int, cfg=None,
                 seed: int = 1234):
        from gad_megatron.checkpoint.megatron_ckpt import read_checkpoint_meta
        from gad_megatron.config import DiscriminatorConfig, ParallelConfig
        from gad_megatron.trainer.roles import InlineGroup
        from gad_megatron.workers.common import WeightsSource
        from gad_megatron.workers.discriminator import DiscriminatorWorker

        ckpt = Path(ckpt_dir)
        # An HF directory would load as a discriminator with a fresh random head: refuse it
        # (read_checkpoint_meta raises naming the missing marker).
        meta, _ = read_checkpoint_meta(ckpt)
        from gad_megatron.checkpoint.convert import refuse_log_ratio

        refuse_log_ratio(ckpt, "scored alone")
        arch_config = json.loads((ckpt / "hf_config.json").read_text())
        # Evaluation runs one rank; the checkpoint loads at any layout it was written with.
        cfg = dataclasses.replace(cfg or DiscriminatorConfig(), parallel=ParallelConfig())
        source = WeightsSource(str(ckpt), arch_config, meta.get("dtype", "float32"))
        self.name = str(ckpt)
        self._group = InlineGroup(DiscriminatorWorker, cfg, source, pad_id, eos_id, seed)

    def scores(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        from gad_megatron.workers.sequences import Sequences

        out = self._group.call("scores", Sequences([list(p) for p in prompts],
                                                   [list(r) for r in responses]))[0]
        return [float(x) for x in out]

    def close(self) -> None:
        self._group.shutdown()
