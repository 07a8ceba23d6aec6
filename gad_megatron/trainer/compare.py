"""Seeded comparisons on the styles task: GAD vs SeqKD vs warmup only, and the paper's
ablations, each arm trained from the same per-seed warmup for the same number of steps and
evaluated by the teacher's acceptance test, in and out of distribution.

    python -m gad_megatron compare [--study compare|frozen-d|warmup|remedies] [--seeds 0 1 2]

The table shows mean ± sd (sample sd, n-1) over the seeds. A seed changes the student's
initial weights, the data order and the sampling seeds; the task files are the same for all.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from gad_megatron.config import load_config
from gad_megatron.evaluation.styles import METRICS


@dataclass(frozen=True)
class Arm:
    """One trained student of a study."""

    label: str
    stage: str | None
    """None: no further training (the base checkpoint itself is evaluated)."""
    config: str = "configs/default.yaml"
    base: str = "warmup"
    """The warmup run it starts from: 'warmup' (the full warmup) or 'd_only' (only the
    warmup's D-only steps: the student is still its random initial self)."""
    overrides: tuple[str, ...] = ()


_GAD = "configs/default_gad.yaml"
STUDIES: dict[str, tuple[Arm, ...]] = {
    "compare": (Arm("warmup only", None), Arm("warmup+seqkd", "seqkd"),
                Arm("warmup+gad", "gad", _GAD)),
    "frozen-d": (Arm("gad, D updated", "gad", _GAD),
                 Arm("gad, D frozen", "gad", _GAD, overrides=("discriminator.update_in_gad=false",))),
    "warmup": (Arm("warmup+gad", "gad", _GAD), Arm("gad, no warmup", "gad", _GAD, base="d_only")),
    "remedies": (Arm("gad", "gad", _GAD),
                 Arm("gad + normalize_scores", "gad", _GAD,
                     overrides=("discriminator.normalize_scores=true",)),
                 Arm("gad + adaptive_temperature", "gad", _GAD,
                     overrides=("discriminator.adaptive_temperature=true",))),
}
COLUMNS = (("test", "accept_sampled", "accept@0.8 ID"), ("test", "accept_greedy", "greedy ID"),
           ("ood", "accept_sampled", "accept@0.8 OOD"), ("ood", "accept_greedy", "greedy OOD"),
           ("test", "rouge_l_sampled", "ROUGE-L ID"))
"""(split, metric, header) of each table column; acceptance first, ROUGE-L last."""


@dataclass(frozen=True)
class Budget:
    """Sizes of one study (the CI version shrinks every one of them)."""

    warmup_steps: int = 500
    steps: int = 100
    n_train: int = 4000
    n_eval: int = 100
    n_samples: int = 4
    backend: str = "inline"
    gad_config: str = _GAD
    """The config of every gad arm (configs/styles_gad.yaml: actor lr 1e-4)."""


def _train(task: Path, out: Path, stage: str, config: str, steps: int, seed: int,
           init_from: Path | None, overrides: list[str], backend: str) -> Path:
    from gad_megatron.trainer.controller import train

    extra = [f"run.out_dir={out}", f"train.stage={stage}", f"train.steps={steps}",
             f"train.seed={1234 + seed}", f"data.seed={1234 + seed}", "train.save_every=0",
             "tracking.enabled=false", f"data.train_files={task / 'train.jsonl'}",
             f"data.eval_files={task / 'test.jsonl'}"]
    if init_from is not None:
        extra.append(f"train.init_from={init_from}")
    if not (out / "checkpoints" / "latest").exists():  # finished before: reuse it
        train(load_config(config, extra + overrides), backend=backend)
    return out


def _evaluate(run: Path, task: Path, budget: Budget, seed: int, cfg) -> dict:
    from gad_megatron.checkpoint.convert import export_student
    from gad_megatron.data import eos_id, load_tokenizer, pad_id
    from gad_megatron.evaluation.pipeline import load_examples
    from gad_megatron.evaluation.styles import evaluate_split
    from gad_megatron.rollout import make_engine
    from gad_megatron.trainer.setup import latest_checkpoint

    import json

    cache = run / f"styles_eval_n{budget.n_eval}_s{budget.n_samples}_seed{seed}.json"
    if cache.is_file():  # evaluated before with the same sizes: the same figures
        return json.loads(cache.read_text())
    hf_dir = export_student(run, latest_checkpoint(str(run)))
    tokenizer = load_tokenizer(str(hf_dir))
    eos = eos_id(tokenizer, cfg.data.eos_token)
    engine = make_engine("hf", str(hf_dir), eos_id=eos, pad_id=pad_id(tokenizer))
    out = {}
    for split in ("test", "ood"):
        examples = load_examples([str(task / f"{split}.jsonl")], cfg.data, tokenizer,
                                 budget.n_eval)
        out[split] = evaluate_split(engine, examples, tokenizer, eos,
                                    n_samples=budget.n_samples,
                                    temperature=cfg.rollout.temperature,
                                    max_new_tokens=cfg.rollout.max_new_tokens, seed=seed)
    cache.write_text(json.dumps(out, indent=1))
    return out


def run_seed(root: Path, study: str, seed: int, budget: Budget, overrides: list[str]) -> dict:
    """Every arm of `study` for one seed: {label: {split: metrics}}. Runs already finished
    under ROOT are reused, so the studies share their warmups and a rerun resumes."""
    task, base = root / "task", root / f"seed{seed}"
    cfg = load_config("configs/default.yaml", overrides)
    bases = {}
    for arm in STUDIES[study]:
        if arm.base in bases:
            continue
        steps = budget.warmup_steps if arm.base == "warmup" else cfg.train.d_only_steps
        bases[arm.base] = _train(task, base / arm.base, "warmup", "configs/default.yaml", steps,
                                 seed, None, overrides, budget.backend)
    results = {}
    for arm in STUDIES[study]:
        run = bases[arm.base]
        if arm.stage is not None:
            config = budget.gad_config if arm.config == _GAD else arm.config
            # Named by what is trained, not by the label: studies share identical arms.
            stem = "" if config in (_GAD, "configs/default.yaml") else "@" + Path(config).stem
            name = "-".join([arm.base, arm.stage + stem,
                             *(o.split(".")[-1] for o in arm.overrides)])
            run = _train(task, base / name, arm.stage, config,
                         budget.steps, seed, bases[arm.base], [*arm.overrides, *overrides],
                         budget.backend)
        results[arm.label] = _evaluate(run, task, budget, seed, cfg)
    return results


def _mean_sd(values: list[float]) -> tuple[float, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def table(per_seed: list[dict], arms: tuple[Arm, ...]) -> str:
    """mean ± sd over seeds of every column, one row per arm."""
    head = f"{'student':<28}" + "".join(f"{h:>16}" for _, _, h in COLUMNS)
    lines = [head, "-" * len(head)]
    for arm in arms:
        cells = []
        for split, metric, _ in COLUMNS:
            m, sd = _mean_sd([seed[arm.label][split][metric] for seed in per_seed])
            cells.append(f"{m:.3f} ± {sd:.3f}")
        lines.append(f"{arm.label:<28}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def verdict(per_seed: list[dict], better: str, than: str) -> list[str]:
    """Per acceptance column: is mean(better) - mean(than) > 2 * max(sd(better), sd(than))?"""
    lines = []
    for split, metric, header in COLUMNS:
        if not metric.startswith("accept"):
            continue
        a, sa = _mean_sd([s[better][split][metric] for s in per_seed])
        b, sb = _mean_sd([s[than][split][metric] for s in per_seed])
        need = 2 * max(sa, sb)
        met = "met" if a - b > need else "NOT met"
        lines.append(f"{header:<16} {better} - {than} = {a - b:+.3f}; 2 sd = {need:.3f}: {met}")
    return lines


def run_study(root: str | Path, study: str = "compare", seeds: tuple[int, ...] = (0, 1, 2),
              budget: Budget = Budget(), overrides: tuple[str, ...] = ()) -> str:
    """Train and evaluate every arm of `study` for every seed; returns the table (and the
    verdict of its first arm pair), also written to ROOT/STUDY.md."""
    from gad_megatron.data.styles_task import write_styles_task

    import torch

    torch.set_num_threads(1)  # fixed reduction order: the same figures on every run
    root = Path(root)
    started = time.perf_counter()
    if not (root / "task" / "train.jsonl").exists():
        write_styles_task(root / "task", n_train=budget.n_train, n_test=budget.n_eval,
                          n_ood=budget.n_eval, seed=0)
    per_seed = [run_seed(root, study, s, budget, list(overrides)) for s in seeds]
    arms = STUDIES[study]
    pair = (arms[-1].label, arms[-2].label) if study == "compare" else (arms[0].label,
                                                                         arms[1].label)
    text = table(per_seed, arms) + "\n\n" + "\n".join(verdict(per_seed, *pair))
    minutes = (time.perf_counter() - started) / 60
    (root / f"{study}.md").write_text(
        f"```\n{text}\n```\n\nseeds {list(seeds)}; {budget}; {minutes:.1f} minutes\n")
    return text
