"""A run's checkpoints: `checkpoints/step_N` directories, each with a manifest, and a `latest`
pointer. Nothing here ever starts a run over on top of checkpoints it was not told to discard.

Save order (a crash at any point leaves the previous checkpoint current and intact):

1. every role writes into `checkpoints/.step_N.partial` (a leftover of a crashed save of the
   same step is removed first: it was never complete and nothing points at it);
2. `trainer_state.json`, then `manifest.json` (every file with its size) is written last;
3. the directory is renamed to `step_N` (an existing `step_N` is moved aside first, removed
   only after `latest` points at the new one);
4. `latest` is rewritten atomically, and checkpoints beyond `keep_last` are pruned.

A checkpoint is *complete* when its manifest exists and every file it lists is there at its
size. Resume uses only complete checkpoints: a `latest` naming a missing or incomplete one is
refused with the problem named, never taken as "no checkpoint, start again" -- that reading
once restarted runs from step 0 and overwrote their good checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from gad_megatron.checkpoint.megatron_ckpt import CheckpointError, file_sizes, size_problem

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
POINTER = "latest"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a sibling temp file, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(ckpt: Path) -> None:
    """List every file under `ckpt` with its size; written last, it marks `ckpt` complete."""
    files = file_sizes(ckpt, skip=(MANIFEST,))
    write_atomic(ckpt / MANIFEST, json.dumps({"files": files}, indent=1))


def problem_with(ckpt: Path) -> str | None:
    """Why `ckpt` is not a complete checkpoint (None when it is). Checks sizes, not hashes:
    a checksum of a 7B run's tens of GB would cost minutes at every resume."""
    if not ckpt.is_dir():
        return "does not exist"
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return f"has no {MANIFEST} (its save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"has an unreadable {MANIFEST}"
    problem = size_problem(ckpt, files)
    if problem is None:
        return None
    path, actual, listed = problem
    return (f"is missing {path}" if actual is None
            else f"has {path} at {actual} bytes, the manifest says {listed}")


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's `step_N` directories, oldest first (complete or not)."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in step_dirs(run_dir) if problem_with(p) is None]


def find_resume(run_dir: Path, fallback: bool = False) -> Path | None:
    """The checkpoint to resume from: None for a run without checkpoints; the one `latest`
    names when it is complete; else an error naming the problem (or, with `fallback`, the
    newest complete checkpoint)."""
    root = run_dir / "checkpoints"
    pointer = root / POINTER
    steps = step_dirs(run_dir)
    if not pointer.is_file() and not steps:
        return None
    if pointer.is_file():
        name = pointer.read_text().strip()
        problem = problem_with(root / name) if name else "is empty"
        if problem is None:
            return root / name
        problem = f"{pointer} names {name!r}, which {problem}"
    else:
        problem = f"{pointer} is missing"
    good = complete_checkpoints(run_dir)
    if fallback and good:
        print(f"warning: {problem}; resuming from the newest complete checkpoint, "
              f"{good[-1].name} (train.resume_fallback=true)", flush=True)
        return good[-1]
    if good:
        hint = (f"the newest complete checkpoint is {good[-1].name}: resume from it with "
                f"train.resume_fallback=true, or point at it with `echo {good[-1].name} > "
                f"{pointer}`")
    else:
        hint = ("no complete checkpoint is left; start over with train.resume=false "
                "train.overwrite=true")
    raise CheckpointError(f"cannot resume {run_dir}: {problem}; {hint}")


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    """train.resume=false: refuse to start over on top of checkpoints unless told to, and
    then discard them first (so no old step directory can later pass for this run's)."""
    root = run_dir / "checkpoints"
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not overwrite:
        newest = step_dirs(run_dir)[-1].name if step_dirs(run_dir) else "partial saves"
        raise CheckpointError(
            f"{run_dir} already holds checkpoints (newest: {newest}) and train.resume=false "
            "would start over on top of them: add train.overwrite=true to discard them, or "
            "choose another run.out_dir")
    print(f"train.overwrite=true: discarding the checkpoints in {root}", flush=True)
    shutil.rmtree(root)


def save_checkpoint(roles, run_dir: Path, step: int, keep_last: int, hf_dir: str,
                    state: dict) -> Path:
    """Every role's full training state as checkpoints/step_N (see the module docstring);
    `state` (the data position under "loader", ...) goes into trainer_state.json."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    partial = root / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        roles.actor.call_all("save", str(partial / "actor"), hf_dir)
        if roles.disc is not None:
            roles.disc.call_all("save", str(partial / "discriminator"))
        write_atomic(partial / STATE_FILE, json.dumps({"step": step, **state}))
        write_manifest(partial)
    except BaseException as exc:  # torch.distributed.checkpoint raises a BaseException
        full = None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else _disk_full(exc, root)
        if full is None:
            raise
        shutil.rmtree(partial, ignore_errors=True)  # give the space back; it was never complete
        pointer = root / POINTER
        kept = pointer.read_text().strip() if pointer.is_file() else "none"
        raise CheckpointError(f"disk full while saving {final.name} in {root} ({full}); the "
                              f"partial save was removed and the latest checkpoint is still "
                              f"{kept}") from None
    aside = root / f".{final.name}.old"
    if final.exists():  # e.g. a step saved again after a resume from an earlier checkpoint
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(partial, final)
    write_atomic(root / POINTER, final.name)
    shutil.rmtree(aside, ignore_errors=True)
    older = [p for p in step_dirs(run_dir) if p != final]
    for old in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(exc: BaseException, root: Path) -> str | None:
    """Why a failed save looks like a full disk (None when it does not), with the device's
    free space beside it. ENOSPC does not always survive: torch.save's zip writer reports a
    short write as 'unexpected pos', and Ray or torch.distributed.checkpoint pass errors on
    as text. So the device is asked too: less free space than the last complete checkpoint
    took is a full disk."""
    where = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(where).free
    done = complete_checkpoints(root.parent)
    need = _size(done[-1]) if done else 1 << 20
    space = (f"{free / 2**20:.1f} MiB free on the device, the last checkpoint took "
             f"{need / 2**20:.1f} MiB")
    if _says_enospc(exc):
        return f"No space left on device; {space}"
    return space if free < need else None


def _says_enospc(exc: BaseException) -> bool:
    """ENOSPC anywhere in the error's cause chain, or in its text."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return "No space left on device" in str(exc)


def _size(ckpt: Path) -> int:
    return sum(json.loads((ckpt / MANIFEST).read_text())["files"].values())


def restore(roles, ckpt: Path, loader) -> dict:
    """Load every role and the data position from a complete checkpoint; its trainer state
    (`step`, and what else the loop saved with it)."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    roles.actor.call_all("load", str(ckpt / "actor"))
    if roles.disc is not None:
        roles.disc.call_all("load", str(ckpt / "discriminator"))
    loader.load_state_dict(state["loader"])
    return state


def checkpoint_of(run_or_ckpt: str, what: str) -> Path:
    """The complete checkpoint a user named by `what` (e.g. train.init_from, --run): a
    checkpoint directory itself, or the one a run's `latest` names. Errors say what to do."""
    path = Path(run_or_ckpt)
    if (path / STATE_FILE).is_file() or (path / MANIFEST).is_file():
        problem = problem_with(path)
        if problem:
            raise CheckpointError(f"{what}={run_or_ckpt}: checkpoint {path} {problem}")
        return path
    if not path.is_dir():
        raise CheckpointError(f"{what}={run_or_ckpt}: no such run directory")
    ckpt = find_resume(path)
    if ckpt is None:
        raise CheckpointError(f"{what}={run_or_ckpt}: the run has no checkpoint yet (it saves "
                              "every train.save_every steps and at its end)")
    return ckpt
