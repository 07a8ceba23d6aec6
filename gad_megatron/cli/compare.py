"""`python -m gad_megatron compare`: seeded studies on the styles task (trainer/compare.py)."""

from __future__ import annotations

import argparse


def _compare(args: argparse.Namespace) -> int:
    from gad_megatron.trainer.compare import Budget, run_study

    budget = Budget(warmup_steps=args.warmup_steps, steps=args.steps, n_train=args.n_train,
                    n_eval=args.n_eval, n_samples=args.n_samples, backend=args.backend,
                    gad_config=args.gad_config)
    text = run_study(args.out, args.study, tuple(args.seeds), budget, tuple(args.overrides),
                     args.jobs)
    print(f"\nstyles task, study '{args.study}', seeds {args.seeds} (mean ± sd); acceptance = "
          f"share of answers the teacher's own test accepts\n\n{text}\n\n"
          f"written to {args.out}/{args.study}.md")
    return 0


def register(sub) -> None:
    from gad_megatron.trainer.compare import STUDIES

    p = sub.add_parser("compare", help="seeded GAD vs SeqKD (and ablation) tables on the "
                                       "styles task")
    p.add_argument("--study", default="compare", choices=list(STUDIES),
                   help="compare: warmup only / seqkd / gad / gad + levers / RL on the task's "
                        "reward; levers: each D lever alone; frozen-d, warmup, remedies: the "
                        "ablations (default compare)")
    p.add_argument("--out", default="runs/styles", help="job directory (finished runs in it "
                                                        "are reused)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--warmup-steps", type=int, default=500,
                   help="warmup steps (default 500: at 150 the student's training rollouts "
                        "were still mostly unparseable)")
    p.add_argument("--steps", type=int, default=100,
                   help="steps of every arm after the warmup (equal for all)")
    p.add_argument("--n-train", type=int, default=4000, help="training rows of the task")
    p.add_argument("--n-eval", type=int, default=100,
                   help="prompts of each evaluation split (in distribution, OOD)")
    p.add_argument("--n-samples", type=int, default=4, help="sampled answers per prompt")
    p.add_argument("--gad-config", default="configs/default_gad.yaml",
                   help="config of the gad arms (default: the demo's, actor lr 3e-5; "
                        "configs/styles_gad.yaml: lr 1e-4)")
    p.add_argument("--backend", default="inline", choices=["inline", "ray"])
    p.add_argument("--jobs", type=int, default=2,
                   help="seeds trained at once, each a process with one thread (default 2: "
                        "the 2-core machine; the figures do not depend on it)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    p.set_defaults(func=_compare)
