"""`python -m gad_megatron train CONFIG.yaml [key=value ...] [--print-config]`."""

from __future__ import annotations

import argparse
import json


def _train(args: argparse.Namespace) -> int:
    import yaml

    from gad_megatron.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from gad_megatron.trainer.controller import train

    def show(step: int, metrics: dict) -> None:
        keys = [k for k in ("d/d_acc", "d/score_gap", "d/d_loss", "g/sft_loss", "g/pg_loss",
                            "g/kl", "g/reward_mean", "time/step") if k in metrics]
        print(json.dumps({"step": step, **{k: round(metrics[k], 4) for k in keys}}), flush=True)

    train(cfg, backend=args.backend, on_step=show)
    print(f"run directory: {cfg.run.out_dir}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="run one stage (warmup, gad or seqkd) of a GAD job")
    p.add_argument("config", help="YAML file of overrides (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("--backend", choices=("ray", "inline"), default="ray",
                   help="ray: worker groups on a Ray cluster; inline: one rank per role in "
                        "this process (a single GPU without Ray)")
    p.set_defaults(func=_train)
