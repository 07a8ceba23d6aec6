"""`python -m gad_megatron convert {hf-to-megatron,megatron-to-hf}`."""

from __future__ import annotations

import argparse


def _hf_to_megatron(args: argparse.Namespace) -> int:
    from gad_megatron.checkpoint.convert import hf_to_megatron

    out = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype)
    print(f"wrote Megatron checkpoint (tp={args.tp}, pp={args.pp}) to {out}")
    return 0


def _megatron_to_hf(args: argparse.Namespace) -> int:
    from gad_megatron.checkpoint.convert import megatron_to_hf

    out = megatron_to_hf(args.ckpt, args.out, tp=args.tp, pp=args.pp)
    print(f"wrote Hugging Face model to {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert between HF and Megatron checkpoints")
    conv = p.add_subparsers(dest="direction", required=True)
    a = conv.add_parser("hf-to-megatron", help="HF directory -> Megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json, *.safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size to shard for")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to shard for")
    a.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default: the HF checkpoint's torch_dtype)")
    a.set_defaults(func=_hf_to_megatron)
    b = conv.add_parser("megatron-to-hf", help="Megatron dist checkpoint -> HF directory")
    b.add_argument("--ckpt", required=True, help="checkpoint directory written by this project")
    b.add_argument("--out", required=True, help="output HF directory")
    b.add_argument("--tp", type=int, default=1, help="ranks to load with (any layout works)")
    b.add_argument("--pp", type=int, default=1,
                   help="pipeline stages to load with (any layout works)")
    b.set_defaults(func=_megatron_to_hf)
