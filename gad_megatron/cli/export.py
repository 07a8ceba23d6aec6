"""`python -m gad_megatron export --run RUN_DIR --out DIR`: the student as an HF directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from gad_megatron.checkpoint.convert import megatron_to_hf
    from gad_megatron.trainer.setup import latest_checkpoint

    ckpt = latest_checkpoint(args.run, "--run")
    out = Path(args.out) if args.out else Path(args.run) / "export" / "student"
    megatron_to_hf(ckpt / "actor", out)
    print(f"student ({ckpt.name}) written as a Hugging Face model to {out}")
    if args.discriminator:
        from gad_megatron.checkpoint.convert import discriminator_to_hf
        from gad_megatron.data import load_tokenizer, pad_id

        d_out = out.parent / "discriminator"
        discriminator_to_hf(ckpt / "discriminator", d_out, pad_id(load_tokenizer(str(out))))
        print(f"discriminator written as a Hugging Face sequence classifier to {d_out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export a run's latest student as an HF directory")
    p.add_argument("--run", required=True, help="run directory (or one of its checkpoints)")
    p.add_argument("--out", default="", help="output directory (default RUN/export/student)")
    p.add_argument("--discriminator", action="store_true",
                   help="also export the discriminator (as *ForSequenceClassification)")
    p.set_defaults(func=_export)
