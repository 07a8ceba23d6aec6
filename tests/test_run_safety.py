"""Defects of issue 15, each reproduced: a broken `latest` or a partly deleted checkpoint must
never restart a run over its good checkpoints; non-finite numbers are skipped, counted and
stop the run, never saved; rows a skip policy drops are reported."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from gad_megatron.checkpoint.megatron_ckpt import CheckpointError
from gad_megatron.trainer.checkpoints import MANIFEST, find_resume
from gad_megatron.trainer.compat import IncompatibleCheckpoint
from gad_megatron.trainer.controller import train
from gad_megatron.trainer.run_lock import LOCK_FILE
from gad_megatron.workers.common import NonFiniteError
from tests.reliability import record
from tests.tiny_models import small_run, small_run_args

pytestmark = pytest.mark.faults


def cfg_for(tmp_path, *extra):
    return small_run(tmp_path, "run", "warmup", "train.steps=4", "train.d_only_steps=1",
                     "train.save_every=2", "train.keep_last=5", "rollout.max_new_tokens=8",
                     "tracking.enabled=false", *extra)


def snapshot(run: Path, with_config: bool = False) -> dict:
    """Every file of the run directory with its bytes (what must survive a refusal); the
    driver's lock file says who holds the run now, and is no part of it."""
    skip = {LOCK_FILE} | (set() if with_config else {"config.json"})
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run with complete checkpoints at steps 2 and 4 (copied per test)."""
    base = tmp_path_factory.mktemp("base")
    train(cfg_for(base), backend="inline")
    return base


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


def refused(tmp_path, *extra, error=CheckpointError) -> tuple[str, float]:
    """The rerun's refusal message and its time; nothing in the run directory changed."""
    before = snapshot(tmp_path / "run")
    t0 = time.monotonic()
    with pytest.raises(error) as err:
        train(cfg_for(tmp_path, "train.steps=6", *extra), backend="inline")
    assert snapshot(tmp_path / "run") == before  # metrics.jsonl and checkpoints untouched
    return str(err.value), time.monotonic() - t0


def test_latest_naming_a_missing_directory_refuses_and_keeps_everything(run_copy):
    (run_copy / "run" / "checkpoints" / "latest").write_text("step_0000009")
    msg, secs = refused(run_copy)
    assert "names 'step_0000009', which does not exist" in msg
    assert "newest complete checkpoint is step_0000004" in msg
    assert "train.resume_fallback=true" in msg
    record("checkpoints/latest names a missing step directory", msg, secs,
           "nothing (run refused; checkpoints and metrics.jsonl untouched)")


def test_latest_without_trainer_state_refuses_then_falls_back_when_asked(run_copy):
    (run_copy / "run" / "checkpoints" / "step_0000004" / "trainer_state.json").unlink()
    msg, secs = refused(run_copy)
    assert "step_0000004" in msg and "trainer_state.json" in msg
    record("latest checkpoint lacks trainer_state.json", msg, secs,
           "nothing; train.resume_fallback=true resumes from the previous complete one")
    history = train(cfg_for(run_copy, "train.steps=6", "train.resume_fallback=true"),
                    backend="inline")
    assert [m["step"] for m in history] == [2, 3, 4, 5]  # from the intact step 2
    logged = [json.loads(x)["step"] for x in
              (run_copy / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(6))


@pytest.mark.parametrize("damage", ["shard", "discriminator", "truncated"])
def test_a_partly_deleted_checkpoint_is_not_complete(run_copy, damage):
    ckpt = run_copy / "run" / "checkpoints" / "step_0000004"
    shard = ckpt / "actor" / "model" / "__0_0.distcp"
    if damage == "shard":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        shutil.rmtree(ckpt / "discriminator")
    msg, secs = refused(run_copy)
    record({"shard": "a shard of the latest checkpoint deleted",
            "truncated": "a shard of the latest checkpoint truncated",
            "discriminator": "the latest checkpoint's discriminator/ deleted"}[damage], msg,
           secs, "nothing (refused; the intact previous checkpoint is offered)")
    if damage == "shard":
        assert f"is missing {shard}" in msg
    elif damage == "truncated":
        assert f"has {shard} at 100 bytes" in msg
    else:
        assert f"is missing {ckpt / 'discriminator'}" in msg
    assert find_resume(run_copy / "run", fallback=True).name == "step_0000002"


def test_resume_false_on_a_run_with_checkpoints_needs_overwrite(run_copy):
    msg, secs = refused(run_copy, "train.resume=false")
    assert "train.overwrite=true" in msg and "step_0000004" in msg
    record("train.resume=false on a run that has checkpoints", msg, secs,
           "nothing unless train.overwrite=true is added")
    history = train(cfg_for(run_copy, "train.resume=false", "train.overwrite=true",
                            "train.save_every=0", "train.steps=1"), backend="inline")
    assert [m["step"] for m in history] == [0]
    assert sorted(p.name for p in (run_copy / "run" / "checkpoints").iterdir()) == [
        "latest", "step_0000001"]


def one_line(capsys, argv: list[str]) -> str:
    """The CLI's single `error:` line for `argv` (exit code 1, no traceback)."""
    from gad_megatron.__main__ import main

    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def logged_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


HOLD = """
import sys, time
from gad_megatron.trainer.run_lock import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_driver_exits_at_once_naming_the_holder_and_kill_9_frees_it(
        run_copy, capsys):
    """Issue 26: the holder is a process of its own, as a first driver would be; its death
    by kill -9 frees the run directory for the resume."""
    import socket
    import subprocess
    import sys

    run = run_copy / "run"
    before = snapshot(run, with_config=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        line = one_line(capsys, ["train", "configs/default.yaml", "--backend", "inline",
                                 *small_run_args(run_copy, "run", "warmup", "train.steps=6")])
        secs = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert line.startswith(f"error: run.out_dir={run} is in use by another driver (pid "
                           f"{holder.pid} on host {socket.gethostname()}, started "), line
    assert snapshot(run, with_config=True) == before  # config, metrics, checkpoints as were
    record("a second driver started on a run directory in use", line, secs,
           "nothing: it exits before any write; the first driver runs on")
    history = train(cfg_for(run_copy, "train.steps=6"), backend="inline")  # lock freed
    assert [m["step"] for m in history] == [4, 5] and logged_steps(run) == list(range(6))


def test_resume_under_another_model_shape_is_refused_naming_each_key(run_copy, capsys):
    config = (run_copy / "run" / "config.json").read_bytes()
    msg, secs = refused(run_copy, "model.tiny_hidden=64", error=IncompatibleCheckpoint)
    assert "cannot resume from step_0000004" in msg
    assert "model.tiny_hidden 32 -> 64" in msg and "hidden_size 32 -> 64" in msg, msg
    assert (run_copy / "run" / "config.json").read_bytes() == config
    record("resume with another model shape (model.tiny_hidden 32 -> 64)", msg, secs,
           "nothing (refused; config.json, metrics.jsonl and checkpoints untouched)")
    line = one_line(capsys, ["train", "configs/default.yaml", "--backend", "inline",
                             *small_run_args(run_copy, "run", "warmup", "train.steps=6",
                                             "model.tiny_layers=3")])
    assert "model.tiny_layers 2 -> 3" in line and "num_layers 2 -> 3" in line, line
    assert (run_copy / "run" / "config.json").read_bytes() == config


def test_init_from_a_run_of_another_shape_is_refused_before_any_write(finished_run, capsys):
    out = finished_run / "seqkd-wide"
    t0 = time.monotonic()
    line = one_line(capsys, ["train", "configs/default.yaml", "--backend", "inline",
                             *small_run_args(finished_run, "seqkd-wide", "seqkd",
                                             f"train.init_from={finished_run / 'run'}",
                                             "model.tiny_hidden=48", "train.steps=1")])
    assert line.startswith(f"error: train.init_from={finished_run / 'run'}: its student"), line
    assert "hidden_size 32 -> 48" in line and "Traceback" not in line
    assert not out.exists(), "a refused run left a directory behind"
    record("seqkd/gad with train.init_from a run of another model shape", line,
           time.monotonic() - t0, "nothing (no run directory written)")


@pytest.fixture
def read_only_run(run_copy):
    """The finished run on a read-only filesystem (a tmpfs remounted ro; needs root)."""
    import subprocess

    from tests.tmpfs import tmpfs

    with tmpfs(run_copy / "ro", "16m") as mnt:
        shutil.copytree(run_copy / "run", mnt / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt


def test_a_run_directory_on_a_read_only_filesystem_gives_one_line(read_only_run, capsys):
    for name in ("run", "new-run"):  # resuming there, and starting there
        t0 = time.monotonic()
        line = one_line(capsys, ["train", "configs/default.yaml", "--backend", "inline",
                                 *small_run_args(read_only_run.parent, "x", "warmup",
                                                 f"run.out_dir={read_only_run / name}")])
        assert line == (f"error: run.out_dir={read_only_run / name}: cannot write there (a "
                        "read-only filesystem): Read-only file system; choose a writable "
                        "run.out_dir"), line
    record("run.out_dir on a read-only filesystem", line, time.monotonic() - t0,
           "nothing (refused before any write)")


def test_every_saved_file_is_in_the_manifest(finished_run):
    ckpt = finished_run / "run" / "checkpoints" / "step_0000004"
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(listed) == on_disk and "discriminator/optim/.metadata" in listed


def test_a_diverging_discriminator_is_skipped_counted_and_stopped(tmp_path):
    """lr=1e30: the first update is finite but huge, then every score is NaN. Those
    updates are skipped (counted), the run stops after 3 in a row naming the role, and no
    checkpoint with NaN weights is written."""
    cfg = cfg_for(tmp_path, "train.steps=10", "train.save_every=1", "train.d_only_steps=10",
                  "discriminator.optim.lr=1e30", "train.max_skipped_steps=3")
    seen = []
    with pytest.raises(NonFiniteError) as err:
        train(cfg, backend="inline", on_step=lambda s, m: seen.append(m))
    msg = str(err.value)
    assert msg.startswith("discriminator: 3 consecutive updates skipped")
    assert "because the loss" in msg and "not finite (d/d_loss=nan" in msg
    skipped = [m["d/skipped"] for m in seen]
    first_bad = skipped.index(1.0)
    assert skipped[first_bad:] == [1.0, 1.0, 1.0] and not any(skipped[:first_bad])
    assert [m["d/skipped_steps"] for m in seen][-1] == 3.0
    assert all(m["d/update_ok"] == 0.0 for m in seen[first_bad:])
    # Skipped steps leave the weights alone, so checkpoints of those steps hold the same
    # (finite) discriminator as the last real update.
    latest = find_resume(tmp_path / "run")
    assert latest is not None and latest.name == f"step_{len(seen) - 1:07d}"
    record("discriminator.optim.lr=1e30 (losses turn NaN)", msg, None,
           "the skipped updates only; weights stay those of the last good step")


def test_a_nan_injected_into_one_loss_skips_that_update_only(tmp_path, monkeypatch):
    from gad_megatron import algorithms

    real, calls = algorithms.sft_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * math.nan if len(calls) == 2 else loss

    monkeypatch.setattr(algorithms, "sft_loss", poisoned)
    history = train(cfg_for(tmp_path, "train.save_every=0"), backend="inline")
    assert [m.get("g/skipped") for m in history] == [None, 0.0, 1.0, 0.0]
    assert history[2]["g/nonfinite_loss"] == 1.0 and history[-1]["g/skipped_steps"] == 1.0
    assert history[2]["g/lr"] == history[3]["g/lr"]
    record("a NaN injected into one step's actor loss", "g/skipped=1 and g/skipped_steps=1 "
           "at that step; the run goes on", None, "that one update")


def test_skip_policy_drops_are_reported(tmp_path, capsys):
    from gad_megatron.data.task import write_task

    write_task(tmp_path / "task", n_train=64, n_test=8, seed=0)
    rows = (tmp_path / "task" / "train.jsonl").read_text().splitlines()
    rows[4] = '{"prompt": "q"}'
    rows[9] = "{oops"
    (tmp_path / "task" / "train.jsonl").write_text("\n".join(rows) + "\n")
    train(cfg_for(tmp_path, "train.steps=1", "train.save_every=0", "data.on_bad_row=skip"),
          backend="inline")
    out = capsys.readouterr().out
    assert "data: 2 rows skipped" in out and "train.jsonl: 2 of 64 rows skipped" in out
    assert "row 5, field 'teacher_response': missing" in out
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["bad"] == {"missing": 1, "invalid_json": 1}
    record("data.on_bad_row=skip with two bad rows", out.split("data: ")[1].splitlines()[0],
           None, "the two rows, reported on the console and in RUN/data_report.json")


def test_weights_holding_nan_are_never_saved(tmp_path, monkeypatch):
    """Weights turned NaN behind the guards' back (here: by hand, after step 2's update)
    make the next save refuse, naming the tensor; the previous checkpoint stays latest."""
    import torch

    from gad_megatron.workers.policy import ActorWorker

    real, calls = ActorWorker.sft_step, []

    def poison_after(self, *args):
        out = real(self, *args)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(self._bare().parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(ActorWorker, "sft_step", poison_after)
    cfg = cfg_for(tmp_path, "train.d_only_steps=0", "train.steps=4", "train.save_every=1")
    with pytest.raises(NonFiniteError) as err:
        train(cfg, backend="inline")
    msg = str(err.value)
    assert msg.startswith("actor: weights hold NaN/inf (first: ") and "not saving" in msg
    assert find_resume(tmp_path / "run").name == "step_0000001"
    assert not (tmp_path / "run" / "checkpoints" / "step_0000002").exists()
    record("actor weights turned NaN between two saves", msg, None,
           "the steps after the last checkpoint; no NaN checkpoint is written")
