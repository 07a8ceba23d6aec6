"""Seeded comparisons on the styles task: GAD vs SeqKD vs warmup only, and the paper's
ablations, each arm trained from the same per-seed warmup for the same number of steps and
evaluated by the teacher's acceptance test, in and out of distribution.

    python -m gad_megatron compare [--study compare|levers|frozen-d|warmup|remedies]
                                   [--seeds 0 1 2] [--jobs 2]

The table shows mean ± sd (sample sd, n-1) over the seeds. A seed changes the student's
initial weights, the data order and the sampling seeds; the task files are the same for all.
Beside the evaluation's columns, two figures of each arm's own *training* rollouts (never an
evaluation split): D's oracle AUC (accepted vs rejected samples, `algorithms.oracle`) and
the share of samples the task accepts, each the mean over the arm's last steps.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from gad_megatron.config import load_config
from gad_megatron.evaluation.styles import METRICS
from gad_megatron.parallel.orphans import die_with_parent


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
    warmup_overrides: tuple[str, ...] = ()
    """Overrides of the warmup it starts from (a D lever that acts during the warmup too);
    arms with the same ones share that warmup."""


_GAD = "configs/default_gad.yaml"
TASK_REWARD = ("reward.source=task",)
"""The RL side's upper bound: the same GRPO update with the task's own verdict as reward."""
NEGATIVES = ("discriminator.negatives=splice,truncate,swap,mismatch",)
D_FROM_STUDENT = ("discriminator.init_from_actor=true", "train.gad_d_only_steps=20")
D_FASTER = ("discriminator.updates_per_step=2",)
LOG_RATIO = ("discriminator.kind=log_ratio", *D_FROM_STUDENT)
"""D as a language model from the student, scored against its frozen start."""
D_LARGER = ("discriminator.tiny_layers=4", "discriminator.tiny_hidden=128")
"""Twice the student's depth and width (about 7x its non-embedding weights)."""
LEVERS = LOG_RATIO
"""The discriminator levers of the 'gad + levers' arm, chosen on training-split signals
only (D's oracle AUC and the acceptance of the training rollouts; docs/training.md)."""
STUDIES: dict[str, tuple[Arm, ...]] = {
    "compare": (Arm("warmup only", None), Arm("warmup+seqkd", "seqkd"),
                Arm("warmup+gad", "gad", _GAD),
                Arm("warmup+gad + levers", "gad", _GAD, overrides=LEVERS),
                Arm("warmup+RL on task reward", "gad", _GAD, overrides=TASK_REWARD)),
    "levers": (Arm("gad", "gad", _GAD),
               Arm("gad + negatives", "gad", _GAD, overrides=NEGATIVES,
                   warmup_overrides=NEGATIVES),
               Arm("gad + D from student", "gad", _GAD, overrides=D_FROM_STUDENT),
               Arm("gad + D(student) + negatives", "gad", _GAD,
                   overrides=D_FROM_STUDENT + NEGATIVES),
               Arm("gad + 2 D updates/step", "gad", _GAD, overrides=D_FASTER,
                   warmup_overrides=D_FASTER),
               Arm("gad + larger D (4x128)", "gad", _GAD, overrides=D_LARGER,
                   warmup_overrides=D_LARGER),
               Arm("gad + log-ratio D", "gad", _GAD, overrides=LOG_RATIO),
               Arm("gad + log-ratio D + negatives", "gad", _GAD,
                   overrides=LOG_RATIO + NEGATIVES),
               Arm("gad + log-ratio D, 2 updates", "gad", _GAD,
                   overrides=LOG_RATIO + D_FASTER)),
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
TRAIN_COLUMNS = (("train", "oracle_auc", "D oracle AUC"), ("train", "accept_rate", "train accept"))
"""Figures of the arm's own training rollouts (its metrics.jsonl), after the evaluation's."""
LABEL = 30
"""Width of the table's first column (the arm's label)."""
TRAIN_WINDOW = 20
"""The training columns are means over the arm's last this many steps."""


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

    # reward.task: every warmup and gad step judges its rollouts (the training columns).
    extra = [f"run.out_dir={out}", f"train.stage={stage}", f"train.steps={steps}",
             f"train.seed={1234 + seed}", f"data.seed={1234 + seed}", "train.save_every=0",
             "tracking.enabled=false", f"data.train_files={task / 'train.jsonl'}",
             f"data.eval_files={task / 'test.jsonl'}", "reward.task=styles"]
    if init_from is not None:
        extra.append(f"train.init_from={init_from}")
    if not (out / "checkpoints" / "latest").exists():  # finished before: reuse it
        train(load_config(config, extra + overrides), backend=backend)
    return out


def training_figures(run: Path, window: int = TRAIN_WINDOW) -> dict[str, float | None]:
    """Means over the run's last `window` steps of d/oracle_auc and task/accept_rate (its
    training rollouts); None where no step of the window has the figure (seqkd has no D;
    the AUC is undefined on steps with only accepted or only rejected samples)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    last = [json.loads(line) for line in lines][-window:]
    out = {}
    for key, name in (("d/oracle_auc", "oracle_auc"), ("task/accept_rate", "accept_rate")):
        values = [m[key] for m in last if key in m]
        out[name] = statistics.fmean(values) if values else None
    return out


def _evaluate(run: Path, task: Path, budget: Budget, seed: int, cfg) -> dict:
    from gad_megatron.checkpoint.convert import export_student
    from gad_megatron.data import eos_id, load_tokenizer, pad_id
    from gad_megatron.evaluation.pipeline import load_examples
    from gad_megatron.evaluation.styles import evaluate_split
    from gad_megatron.rollout import make_engine
    from gad_megatron.trainer.setup import latest_checkpoint

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


def _short(override: str) -> str:
    return override.split(".")[-1].replace(",", "+")


def _base_name(arm: Arm) -> str:
    return "-".join([arm.base, *map(_short, arm.warmup_overrides)])


def _arm_config(arm: Arm, budget: Budget) -> str:
    """The config an arm trains with: the budget's gad config for the gad arms."""
    return budget.gad_config if arm.config == _GAD else arm.config


def _arm_name(arm: Arm, config: str) -> str:
    # Named by what is trained, not by the label: studies share identical arms.
    stem = "" if config in (_GAD, "configs/default.yaml") else "@" + Path(config).stem
    return "-".join([_base_name(arm), arm.stage + stem, *map(_short, arm.overrides)])


def run_seed(root: Path, study: str, seed: int, budget: Budget, overrides: list[str]) -> dict:
    """Every arm of `study` for one seed: {label: {split: metrics}}. Runs already finished
    under ROOT are reused, so the studies share their warmups and a rerun resumes."""
    task, base = root / "task", root / f"seed{seed}"
    cfg = load_config("configs/default.yaml", overrides)
    bases = {}
    for arm in STUDIES[study]:
        name = _base_name(arm)
        if name in bases:
            continue
        steps = budget.warmup_steps if arm.base == "warmup" else cfg.train.d_only_steps
        bases[name] = _train(task, base / name, "warmup", "configs/default.yaml", steps, seed,
                             None, [*arm.warmup_overrides, *overrides], budget.backend)
    results = {}
    for arm in STUDIES[study]:
        run = bases[_base_name(arm)]
        if arm.stage is not None:
            config = _arm_config(arm, budget)
            run = _train(task, base / _arm_name(arm, config), arm.stage, config,
                         budget.steps, seed, run, [*arm.overrides, *overrides], budget.backend)
        results[arm.label] = {**_evaluate(run, task, budget, seed, cfg),
                              "train": training_figures(run)}
    return results


def plot_oracle_auc(root: Path, study: str, seeds: tuple[int, ...], out: Path,
                    budget: Budget) -> Path | None:
    """A PNG of d/oracle_auc over the steps of every arm that trains a D after the warmup,
    the mean over the seeds at each step (a step where no seed has the figure is a gap),
    smoothed over 5 steps; None when no arm has the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    drawn = 0
    for arm in STUDIES[study]:
        if arm.stage != "gad":
            continue
        name = _arm_name(arm, _arm_config(arm, budget))
        per_step: dict[int, list[float]] = {}
        for seed in seeds:
            path = root / f"seed{seed}" / name / "metrics.jsonl"
            for m in map(json.loads, path.read_text().splitlines() if path.exists() else []):
                if "d/oracle_auc" in m:
                    per_step.setdefault(int(m["step"]), []).append(m["d/oracle_auc"])
        if not per_step:
            continue
        steps = sorted(per_step)
        means = [statistics.fmean(per_step[k]) for k in steps]
        smooth = [statistics.fmean(means[max(0, i - 4):i + 1]) for i in range(len(means))]
        ax.plot(steps, smooth, label=arm.label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(f"D's oracle AUC on training rollouts (mean of seeds {list(seeds)}, "
                 f"5-step mean)")
    ax.set_xlabel("gad step")
    ax.set_ylabel("AUC accepted vs rejected")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _run_seed_job(job: tuple) -> dict:
    import torch

    torch.set_num_threads(1)
    return run_seed(*job)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def _cell(values: list) -> str:
    if any(v is None for v in values):
        return "–"
    m, sd = _mean_sd(values)
    return f"{m:.3f} ± {sd:.3f}"


def table(per_seed: list[dict], arms: tuple[Arm, ...]) -> str:
    """mean ± sd over seeds of every column, one row per arm ("–": an arm without the
    figure, e.g. seqkd's D oracle AUC)."""
    columns = COLUMNS + TRAIN_COLUMNS
    head = f"{'student':<{LABEL}}" + "".join(f"{h:>16}" for _, _, h in columns)
    lines = [head, "-" * len(head)]
    for arm in arms:
        cells = [_cell([seed[arm.label].get(split, {}).get(metric) for seed in per_seed])
                 for split, metric, _ in columns]
        lines.append(f"{arm.label:<{LABEL}}" + "".join(f"{c:>16}" for c in cells))
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


GOALS: dict[str, tuple[tuple[str, str], ...]] = {
    "compare": (("warmup+gad + levers", "warmup+seqkd"), ("warmup+gad + levers", "warmup only"),
                ("warmup+gad", "warmup+seqkd"), ("warmup+RL on task reward", "warmup+seqkd")),
}
"""(better, than) pairs whose verdict a study prints; other studies: first arm vs second.
compare: the goal (gad with the levers over seqkd and over warmup alone), plain gad, and
whether the RL side itself beats seqkd given a right reward."""


def run_study(root: str | Path, study: str = "compare", seeds: tuple[int, ...] = (0, 1, 2),
              budget: Budget = Budget(), overrides: tuple[str, ...] = (),
              jobs: int = 1) -> str:
    """Train and evaluate every arm of `study` for every seed (`jobs` seeds at a time, each
    in a process of its own with one thread); returns the table and its verdicts, also
    written to ROOT/STUDY.md."""
    from gad_megatron.data.styles_task import write_styles_task

    import torch

    torch.set_num_threads(1)  # fixed reduction order: the same figures on every run
    root = Path(root)
    started = time.perf_counter()
    if not (root / "task" / "train.jsonl").exists():
        write_styles_task(root / "task", n_train=budget.n_train, n_test=budget.n_eval,
                          n_ood=budget.n_eval, seed=0)
    work = [(root, study, s, budget, list(overrides)) for s in seeds]
    if jobs > 1 and len(seeds) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per seed (no inherited torch or process-group state);
        # an executor's workers, unlike a Pool's, may start the checkpoint writer's children.
        with ProcessPoolExecutor(min(jobs, len(seeds)), mp.get_context("spawn"),
                                 initializer=die_with_parent) as pool:
            per_seed = list(pool.map(_run_seed_job, work))
    else:
        per_seed = [run_seed(*w) for w in work]
    arms = STUDIES[study]
    pairs = GOALS.get(study, ((arms[0].label, arms[1].label),))
    text = table(per_seed, arms) + "\n\n" + "\n".join(
        line for pair in pairs for line in verdict(per_seed, *pair))
    minutes = (time.perf_counter() - started) / 60
    (root / f"{study}.md").write_text(
        f"```\n{text}\n```\n\nseeds {list(seeds)}; {budget}; jobs {jobs}; "
        f"{minutes:.1f} minutes\n")
    (root / f"{study}.json").write_text(json.dumps(per_seed, indent=1))
    plot_oracle_auc(root, study, seeds, root / f"{study}_oracle_auc.png", budget)
    return text
