"""HF directory <-> Megatron distributed checkpoint, at any (tp, pp).

The rank functions run under torchrun / a Ray worker (RANK etc. already set) or in ranks
spawned here on one host (CPU machines, or one GPU per rank).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gad_megatron.models.hf_config import read_hf_config


def _hf_dtype(arch) -> torch.dtype:
    name = arch.raw.get("torch_dtype") or arch.raw.get("dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""))


def hf_to_megatron_rank(rank: int, world: int, hf_dir: str, out_dir: str, tp: int, pp: int,
                        dtype: str | None) -> str:
    from gad_megatron.checkpoint.hf_io import load_hf_weights
    from gad_megatron.checkpoint.megatron_ckpt import save_model_checkpoint
    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed, shutdown

    arch = read_hf_config(hf_dir)
    init_distributed(ParallelLayout(tp=tp, pp=pp))
    try:
        # Keep the checkpoint's own dtype unless asked otherwise: the round trip is bitwise.
        opts = BuildOptions(dtype=getattr(torch, dtype) if dtype else _hf_dtype(arch),
                            init_weights=False)
        model = build_gpt(arch, tp, pp, opts)
        load_hf_weights(model, arch, hf_dir)
        save_model_checkpoint(model, arch, out_dir, tp, pp, tokenizer_src=hf_dir)
    finally:
        shutdown()
    return out_dir


def megatron_to_hf_rank(rank: int, world: int, ckpt_dir: str, out_dir: str, tp: int,
                        pp: int) -> str:
    import torch.distributed as dist

    from gad_megatron.checkpoint.hf_io import export_hf_tensors, save_hf_dir
    from gad_megatron.checkpoint.megatron_ckpt import (
        dtype_of, load_model_checkpoint, read_checkpoint_meta)
    from gad_megatron.models.builder import BuildOptions, build_gpt
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed, shutdown

    meta, arch = read_checkpoint_meta(ckpt_dir)
    init_distributed(ParallelLayout(tp=tp, pp=pp))
    try:
        model = build_gpt(arch, tp, pp, BuildOptions(dtype=dtype_of(meta), init_weights=False))
        load_model_checkpoint(model, ckpt_dir)
        save_hf_dir(export_hf_tensors(model, arch), arch, out_dir, tokenizer_src=ckpt_dir,
                    write=dist.get_rank() == 0)
        dist.barrier()
    finally:
        shutdown()
    return out_dir


def run_ranks(fn, world: int, args: tuple) -> None:
    """Run `fn` on this process if a launcher already made us one rank of `world`, else spawn."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == world:
        fn(int(os.environ["RANK"]), world, *args)
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise ValueError(f"{world} ranks need {world} GPUs; {torch.cuda.device_count()} visible")
    from gad_megatron.parallel.launch import spawn_ranks

    spawn_ranks(fn, world, args=args, timeout_s=float(os.environ.get("GAD_CONVERT_TIMEOUT", 3600)))


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1,
                   dtype: str | None = None, allow_pickle: bool = False) -> Path:
    """Convert an HF model directory to a Megatron distributed checkpoint at (tp, pp).
    Pickle-only weights are refused unless `allow_pickle` (then read with weights_only=True
    into a temporary safetensors copy beside `out_dir`)."""
    import shutil
    import tempfile

    from gad_megatron.models.hf_config import check_parallel
    from gad_megatron.checkpoint.hf_io import HFTensorIndex, safe_weights_dir

    arch = read_hf_config(hf_dir)
    check_parallel(arch, tp, pp)
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{Path(out_dir).name}.weights-",
                                    dir=Path(out_dir).parent))
    try:
        hf_dir = safe_weights_dir(hf_dir, scratch / "hf", allow_pickle)
        HFTensorIndex(hf_dir).check_against(arch)  # fail before spawning anything
        run_ranks(hf_to_megatron_rank, tp * pp, (str(hf_dir), str(out_dir), tp, pp, dtype))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Path(out_dir)


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Convert a Megatron checkpoint (written at any layout) to an HF directory."""
    from gad_megatron.checkpoint.megatron_ckpt import read_checkpoint_meta

    read_checkpoint_meta(ckpt_dir)
    run_ranks(megatron_to_hf_rank, tp * pp, (str(ckpt_dir), str(out_dir), tp, pp))
    return Path(out_dir)


def export_student(run_dir: str | Path, ckpt: str | Path) -> Path:
    """`RUN/export/student` as an HF directory, exported from `ckpt/actor` unless an export
    at least as new as that checkpoint is already there. The export itself is atomic
    (save_hf_dir writes a temporary directory and renames it into place)."""
    out = Path(run_dir) / "export" / "student"
    marker = Path(ckpt) / "actor" / "gad_checkpoint.json"
    done = out / "config.json"
    # The `export` command writes the same directory, so age (not a private marker) decides.
    if done.is_file() and done.stat().st_mtime >= marker.stat().st_mtime:
        return out
    megatron_to_hf(Path(ckpt) / "actor", out)
    print(f"exported {Path(ckpt).name}/actor to {out}")
    return out


def discriminator_to_hf_rank(rank: int, world: int, ckpt_dir: str, out_dir: str,
                             pad_id: int) -> str:
    import dataclasses

    import torch.distributed as dist

    from gad_megatron.checkpoint.hf_io import save_hf_dir
    from gad_megatron.checkpoint.megatron_ckpt import (
        dtype_of, load_model_checkpoint, read_checkpoint_meta)
    from gad_megatron.models.builder import BuildOptions
    from gad_megatron.models.discriminator import (
        build_discriminator, export_discriminator_tensors, sequence_classification_config)
    from gad_megatron.parallel.dist import ParallelLayout, init_distributed, shutdown

    meta, arch = read_checkpoint_meta(ckpt_dir)
    init_distributed(ParallelLayout())
    try:
        model = build_discriminator(arch, 1, 1, BuildOptions(dtype=dtype_of(meta),
                                                             init_weights=False))
        load_model_checkpoint(model, ckpt_dir)
        out_arch = dataclasses.replace(arch, raw=sequence_classification_config(arch, pad_id))
        save_hf_dir(export_discriminator_tensors(model, arch), out_arch, out_dir,
                    tokenizer_src=ckpt_dir, write=dist.get_rank() == 0)
    finally:
        shutdown()
    return out_dir


def refuse_log_ratio(ckpt_dir: str | Path, what: str) -> None:
    """A log-ratio D (discriminator.kind) is a language model scored against the frozen
    weights it started from, which its checkpoint does not hold: it cannot be `what`."""
    from gad_megatron.workers.discriminator import KIND_FILE

    marker = Path(ckpt_dir) / KIND_FILE
    if marker.is_file():
        raise ValueError(f"{ckpt_dir}: a {marker.read_text().strip()} discriminator (a "
                         f"language model scored against its starting weights) cannot be "
                         f"{what}; its weights load as a student with `convert`")


def discriminator_to_hf(ckpt_dir: str | Path, out_dir: str | Path, pad_id: int) -> Path:
    """Export a discriminator checkpoint as HF `*ForSequenceClassification` (num_labels=1).

    HF scores the last token that is not `pad_id`; our discriminator scores the last valid
    token, so the two agree when the pad id is not also the EOS id (the built-in tokenizer
    keeps them apart)."""
    from gad_megatron.checkpoint.megatron_ckpt import read_checkpoint_meta

    read_checkpoint_meta(ckpt_dir)
    refuse_log_ratio(ckpt_dir, "exported as a sequence classifier")
    run_ranks(discriminator_to_hf_rank, 1, (str(ckpt_dir), str(out_dir), pad_id))
    return Path(out_dir)
