"""Megatron distributed checkpoints of one model, written atomically.

Layout of a checkpoint directory:

    gad_checkpoint.json   format, (tp, pp) it was written at, dtype, megatron-core version
    hf_config.json        the HF config.json of the architecture (for export and rebuild)
    tokenizer files       copied from the HF source, so export can carry them on
    model/                Megatron dist_checkpointing (torch_dist), loadable at any (tp, pp)

Every rank writes into a temporary sibling directory; rank 0 renames it into place only after
all ranks finished, and the marker file is written last, so a crash mid-save never leaves a
directory that looks like a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from gad_megatron.checkpoint.hf_io import copy_tokenizer_files
from gad_megatron.models.hf_config import HFArch, parse_hf_config

FORMAT = "gad-megatron/model-v1"
MARKER = "gad_checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, partial or of another format."""


def _shared_tmpdir(out: Path) -> Path:
    # Rank 0 picks the temp name; the others learn it, so all write into one directory.
    name = [None]
    if dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        name[0] = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def save_model_checkpoint(model, arch: HFArch, out_dir: str | Path, tp: int, pp: int,
                          tokenizer_src: str | Path | None = None) -> Path:
    """Collective: save this model's shards (all ranks) as a Megatron dist checkpoint."""
    from megatron.core import dist_checkpointing, package_info

    out = Path(out_dir)
    tmp = _shared_tmpdir(out)
    try:
        if dist.get_rank() == 0:
            (tmp / "model").mkdir(exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "model"))
        dist.barrier()
        if dist.get_rank() == 0:
            (tmp / "hf_config.json").write_text(json.dumps(arch.raw, indent=2, sort_keys=True))
            copy_tokenizer_files(tokenizer_src, tmp)
            dtype = str(next(model.parameters()).dtype).replace("torch.", "")
            meta = {"format": FORMAT, "tp": tp, "pp": pp, "dtype": dtype,
                    "megatron_core": package_info.__version__}
            (tmp / MARKER).write_text(json.dumps(meta, indent=2))  # last: marks it complete
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return out


def read_checkpoint_meta(ckpt_dir: str | Path) -> tuple[dict, HFArch]:
    """The marker metadata and the architecture of a complete checkpoint directory."""
    ckpt = Path(ckpt_dir)
    marker = ckpt / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{ckpt}: not a complete gad-megatron checkpoint (no {MARKER})")
    meta = json.loads(marker.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{marker}: format {meta.get('format')!r}, expected {FORMAT!r}")
    arch = parse_hf_config(json.loads((ckpt / "hf_config.json").read_text()))
    return meta, arch


def load_model_checkpoint(model, ckpt_dir: str | Path) -> None:
    """Collective: load a checkpoint into this rank's shard, whatever (tp, pp) wrote it."""
    from megatron.core import dist_checkpointing

    read_checkpoint_meta(ckpt_dir)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(Path(ckpt_dir) / "model"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: state mismatch; missing {missing[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")


def dtype_of(meta: dict) -> torch.dtype:
    return getattr(torch, meta.get("dtype", "float32"))


# ---------------------------------------------------------------------------------------------
# Training state: model + optimizer + LR scheduler + RNG, for exact resume
# ---------------------------------------------------------------------------------------------

TRAIN_MARKER = "training_state.json"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_training_state(model, optimizer, scheduler, arch: HFArch, out_dir: str | Path,
                        tp: int, pp: int, tokenizer_src: str | Path | None = None) -> Path:
    """Collective: a model checkpoint (loadable alone, e.g. by `convert` or `init_from`) plus
    the optimizer state (its own dist checkpoint, reshardable across DP), the scheduler and
    every rank's RNG state. The training marker is written last, after every part exists."""
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    save_model_checkpoint(model, arch, out, tp, pp, tokenizer_src)
    optim_dir = out / "optim.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(optim_dir, ignore_errors=True)
        optim_dir.mkdir()
    dist.barrier()
    model_sd = model.sharded_state_dict()
    dist_checkpointing.save({"optimizer": optimizer.sharded_state_dict(model_sd)}, str(optim_dir))
    torch.save(_rng_state(), out / f"rng_rank{dist.get_rank():05d}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(optim_dir, out / "optim")
        (out / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (out / TRAIN_MARKER).write_text(json.dumps({"format": FORMAT, "world": dist.get_world_size()}))
    dist.barrier()
    return out


def has_training_state(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / TRAIN_MARKER).is_file()


def load_training_state(model, optimizer, scheduler, ckpt_dir: str | Path) -> None:
    """Collective: restore what save_training_state wrote (model at any layout; RNG only when
    the world size is unchanged)."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt_dir)
    if not has_training_state(ckpt):
        raise CheckpointError(f"{ckpt}: no complete training state ({TRAIN_MARKER} missing)")
    load_model_checkpoint(model, ckpt)
    model_sd = model.sharded_state_dict()
    optim_sd = {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
    state = dist_checkpointing.load(optim_sd, str(ckpt / "optim"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    meta = json.loads((ckpt / TRAIN_MARKER).read_text())
    rng_file = ckpt / f"rng_rank{dist.get_rank():05d}.pt"
    if meta.get("world") == dist.get_world_size() and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
