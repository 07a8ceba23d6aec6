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
from gad_megatron.parallel.orphans import guard_forked_children

FORMAT = "gad-megatron/model-v1"
MARKER = "gad_checkpoint.json"


# The distributed optimizer's state is saved in Megatron's canonical per-parameter layout, so a
# run can resume at another TP/PP/DP layout. Its 0.16 default ('fully_sharded_model_space')
# builds flattened-range ShardedTensors that the same version's dist_checkpointing refuses, and
# 'dp_reshardable' fails to load here even at the same TP (tried: KeyError / in-place view
# errors with torch Adam). Cost to know at scale: saving gathers each model-parallel shard's
# fp32 params and Adam moments on its DP rank 0 (12 bytes/param / (TP*PP)). The replicated
# optimizer ignores this key.
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, partial or of another format."""


def _exit_with_parent(parent_pid: int) -> None:
    """Runs in the manager process: leave as soon as the process that started it is gone."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _orphan_safe_results_queue() -> None:
    """Megatron's torch_dist writer collects per-rank results through a queue served by a
    spawned multiprocessing Manager, created on the first save and never stopped. When the
    trainer is killed (-9, OOM killer, a preempted node) that server lives on forever as an
    orphan (seen here: one per killed run). Install the same kind of queue from a manager
    that exits within a second of its parent; only while Megatron has not made its own."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    if getattr(fsa, "_results_queue", "absent") is not None:
        return  # already made (ours or Megatron's), or another Megatron without this global
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_exit_with_parent, (os.getpid(),))
    fsa._results_queue = manager.Queue()
    fsa._gad_results_manager = manager  # keeps the server (and its queue) alive


def _shared_tmpdir(out: Path) -> Path:
    # Rank 0 picks the temp name; the others learn it, so all write into one directory.
    name = [None]
    if dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        name[0] = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def file_sizes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Every file under `root` with its size (names in `skip` left out): what a checkpoint
    lists last, so that a missing or cut-short file can be told on load."""
    return {str(p.relative_to(root)): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def size_problem(root: Path, files: dict[str, int]) -> tuple[Path, int | None, int] | None:
    """The first listed file that is missing or not at its listed size, as (path, size on
    disk or None when missing, listed size); None when every file is as listed."""
    for rel, size in files.items():
        path = root / rel
        if not path.is_file():
            return path, None, size
        if path.stat().st_size != size:
            return path, path.stat().st_size, size
    return None


def save_model_checkpoint(model, arch: HFArch, out_dir: str | Path, tp: int, pp: int,
                          tokenizer_src: str | Path | None = None) -> Path:
    """Collective: save this model's shards (all ranks) as a Megatron dist checkpoint."""
    from megatron.core import dist_checkpointing, package_info

    out = Path(out_dir)
    _orphan_safe_results_queue()
    guard_forked_children()  # Megatron forks its shard writers below (parallel/orphans.py)
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
                    "megatron_core": package_info.__version__, "files": file_sizes(tmp)}
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
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        raise CheckpointError(f"{marker}: not valid JSON (a damaged checkpoint)") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{marker}: format {meta.get('format')!r}, expected {FORMAT!r}")
    problem = size_problem(ckpt, meta.get("files", {}))  # no list before v0.1.1
    if problem is not None:
        path, actual, listed = problem
        if actual is None:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint, {path} is missing")
        raise CheckpointError(f"{ckpt}: damaged checkpoint, {path} has {actual} bytes, "
                              f"{MARKER} says {listed}")
    arch = parse_hf_config(json.loads((ckpt / "hf_config.json").read_text()))
    return meta, arch


def load_model_checkpoint(model, ckpt_dir: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Collective: load a checkpoint into this rank's shard, whatever (tp, pp) wrote it.
    Parameters whose names start with a `skip` prefix keep their values (a discriminator's
    fresh head over a student's backbone)."""
    from megatron.core import dist_checkpointing

    read_checkpoint_meta(ckpt_dir)
    wanted = {k: v for k, v in model.sharded_state_dict().items()
              if not (skip and k.startswith(skip))}
    state = dist_checkpointing.load(wanted, str(Path(ckpt_dir) / "model"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing
               if not k.endswith("_extra_state") and not (skip and k.startswith(skip))]
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
    # An optimizer that has not stepped yet (warmup's actor during d_only_steps) has no Adam
    # state to save, and its checkpoint could not be loaded: give it the zeros torch would
    # create at the first step (the same numbers, so the run is unchanged).
    _fill_empty_adam_state(optimizer)
    model_sd = model.sharded_state_dict()
    optim_sd = optimizer.sharded_state_dict(model_sd, metadata=OPTIM_METADATA)
    dist_checkpointing.save({"optimizer": optim_sd}, str(optim_dir))
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


def _torch_adams(optimizer):
    """The torch Adam(W) instances inside a Megatron (possibly chained) optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield inner


def _fill_empty_adam_state(optimizer) -> None:
    """Give a fresh torch Adam the state entries a checkpoint load overwrites.

    Megatron's DistributedOptimizer reads `state["step"]` of every parameter when it builds
    its sharded state dict, which a torch Adam (the optimizer without TE or Apex, as on CPU)
    only has after its first step. Zeros, written without stepping, leave the weights alone."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if "step" not in inner.state[p]:
                    inner.state[p].update(step=torch.zeros((), dtype=torch.float32),
                                          exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


def _unshare_adam_steps(optimizer) -> None:
    """Megatron 0.16.1's DistributedOptimizer.load_state_dict gives every parameter of a torch
    Adam the *same* step tensor; torch increments each parameter's step in place, so the next
    update would count one step per parameter and use wrong bias corrections. One copy each."""
    for inner in _torch_adams(optimizer):
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _skip_torch_adam_step_on_reshardable_load() -> None:
    """Megatron 0.16.1 bug, torch Adam only (no TE/Apex, e.g. on CPU): loading a
    'fully_reshardable' distributed-optimizer state skips the per-parameter "step" on the
    source side (it is restored from the param groups) but then copies every destination key,
    "step" included, and fails with KeyError('step'). Copy only the keys the source has.
    Installed once, on the first load; the fused TE/Apex optimizers never reach this path."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_gad_step_fix", False):
        return

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                main_param.detach().copy_(tensors["param"])
                for key in state:
                    if key != "step":
                        state[key].copy_(tensors[key])
                return
        original(self, model_param, tensors)

    set_states._gad_step_fix = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _restore_zero_step(loaded) -> None:
    """Megatron 0.16.1 saves the shared Adam step only `if step:`, so a checkpoint written
    before the first update (step 0: warmup's actor during d_only_steps) comes back without
    any step and torch Adam's load fails with KeyError('step'). Put the 0 back."""
    if not isinstance(loaded, dict):
        return
    per_param = loaded.get("state")
    if isinstance(per_param, dict) and per_param and "common_step" not in per_param and all(
            isinstance(v, dict) and v and "step" not in v
            for k, v in per_param.items() if isinstance(k, int)):
        per_param["common_step"] = torch.zeros((), dtype=torch.float32)
    for value in loaded.values():
        if isinstance(value, dict) and value is not per_param:
            _restore_zero_step(value)


def load_training_state(model, optimizer, scheduler, ckpt_dir: str | Path) -> None:
    """Collective: restore what save_training_state wrote (model at any layout; RNG only when
    the world size is unchanged)."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt_dir)
    if not has_training_state(ckpt):
        raise CheckpointError(f"{ckpt}: no complete training state ({TRAIN_MARKER} missing)")
    _fill_empty_adam_state(optimizer)
    _skip_torch_adam_step_on_reshardable_load()
    load_model_checkpoint(model, ckpt)
    model_sd = model.sharded_state_dict()
    optim_sd = {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                          metadata=OPTIM_METADATA)}
    state = dist_checkpointing.load(optim_sd, str(ckpt / "optim"))
    _restore_zero_step(state["optimizer"])
    optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(optimizer)
    scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    meta = json.loads((ckpt / TRAIN_MARKER).read_text())
    rng_file = ckpt / f"rng_rank{dist.get_rank():05d}.pt"
    if meta.get("world") == dist.get_world_size() and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
