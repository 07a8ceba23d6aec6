"""The driver as a user (or Slurm) drives it: signals stop it cleanly with a checkpoint, the
rerun resumes to the same numbers, and damaged inputs give one line, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gad_megatron.data.task import write_task
from tests.reliability import record

pytestmark = pytest.mark.faults

COMPARED = ("d/d_loss", "d/score_gap", "g/sft_loss", "g/grad_norm", "d/grad_norm")


def command(tmp_path: Path, steps: int, *extra: str) -> list[str]:
    task = tmp_path / "task"
    if not (task / "train.jsonl").exists():
        write_task(task, n_train=64, n_test=8, seed=0)
    return [sys.executable, "-m", "gad_megatron", "train", "configs/default.yaml",
            "--backend", "inline", f"run.out_dir={tmp_path / 'run'}", "train.stage=warmup",
            f"train.steps={steps}", "train.prompts_per_step=4", "train.save_every=0",
            "train.d_only_steps=1", f"data.train_files={task / 'train.jsonl'}", "rollout.n=2",
            "model.tiny_hidden=32", "rollout.max_new_tokens=8", "tracking.enabled=false",
            *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def signal_after_step(proc: subprocess.Popen, step: int, sig: int) -> tuple[str, float]:
    """Send `sig` once the driver has printed step `step`: everything it printed, and the
    seconds from the signal to its exit."""
    lines, sent = [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("{") and json.loads(line)["step"] == step:
            proc.send_signal(sig)
            sent = time.monotonic()
            break
    lines.extend(proc.stdout)
    proc.wait(timeout=120)
    assert sent is not None, "the driver ended before step %d:\n%s" % (step, "".join(lines)[-3000:])
    return "".join(lines), time.monotonic() - sent


def logged(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def stop_with(tmp_path: Path, sig: int) -> int:
    """Signal a long run after step 2: it exits 0 with a checkpoint; the step it saved."""
    proc = start(command(tmp_path, 400))
    out, secs = signal_after_step(proc, 2, sig)
    assert proc.returncode == 0, out
    stopped = [ln for ln in out.splitlines() if ln.startswith("stopped by")]
    assert len(stopped) == 1 and stopped[0].startswith(f"stopped by {sig.name} at step ")
    n = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 3 <= n < 400 and f"checkpoint step {n} saved" in stopped[0]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step_{n:07d}"
    record(f"{sig.name} to the driver mid-run", stopped[0], secs,
           "nothing: the step in progress finishes and is saved; exit code 0")
    return n


def test_sigterm_saves_and_exits_0(tmp_path):
    stop_with(tmp_path, signal.SIGTERM)


@pytest.mark.slow  # three driver runs (~1 min); SIGTERM's stop stays in the quick tier: in `make test-all` (CI), not the quick `make test`
def test_sigusr1_saves_exits_0_and_the_rerun_resumes_identically(tmp_path):
    n = stop_with(tmp_path, signal.SIGUSR1)
    # The rerun of the same command resumes there; both halves equal one straight run.
    total = n + 2
    res = subprocess.run(command(tmp_path, total), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming from step {n} (checkpoint" in res.stdout
    resumed = logged(tmp_path)
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    (straight_dir / "task").symlink_to(tmp_path / "task")
    res = subprocess.run(command(straight_dir, total), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    straight = logged(straight_dir)
    assert [m["step"] for m in resumed] == list(range(total))
    assert [{k: m.get(k) for k in COMPARED} for m in resumed] == \
        [{k: m.get(k) for k in COMPARED} for m in straight]


def test_ctrl_c_says_where_it_stopped_and_exits_130(tmp_path):
    proc = start(command(tmp_path, 400, "train.save_every=2"))
    out, secs = signal_after_step(proc, 4, signal.SIGINT)
    assert proc.returncode == 130, out
    line = [ln for ln in out.splitlines() if ln.startswith("interrupted at step")]
    assert line and line[0].endswith("last checkpoint step 4"), out[-2000:]
    assert "Traceback" not in out
    record("Ctrl-C (SIGINT) mid-run", line[0] + " (exit code 130)", secs,
           "the steps after the last checkpoint")


def one_line_error(cmd: list[str], timeout: int = 120) -> tuple[str, float]:
    started = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 1, (res.stdout[-1000:], res.stderr[-2000:])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return errors[0], time.monotonic() - started


def test_a_truncated_safetensors_file_is_named_before_any_worker_starts(tmp_path):
    from tests.tiny_models import make_hf_model

    model = make_hf_model("qwen3", tmp_path / "hf")
    shard = next(model.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    err, secs = one_line_error(command(tmp_path, 2, f"model.hf_path={model}",
                                       "data.tokenizer=builtin"))
    assert str(shard) in err and "not a readable safetensors file" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    record("a truncated safetensors file as model.hf_path", err, secs,
           "nothing (no worker started)")


def test_convert_of_a_partial_checkpoint_names_the_missing_file(tmp_path):
    from tests.tiny_models import make_hf_model

    model = make_hf_model("llama", tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    gad = [sys.executable, "-m", "gad_megatron", "convert"]
    subprocess.run([*gad, "hf-to-megatron", "--hf", str(model), "--out", str(ckpt)],
                   check=True, capture_output=True, timeout=300)
    shard = sorted((ckpt / "model").glob("*.distcp"))[0]
    shard.unlink()
    err, secs = one_line_error([*gad, "megatron-to-hf", "--ckpt", str(ckpt), "--out",
                                str(tmp_path / "out")])
    assert f"incomplete checkpoint, {shard} is missing" in err
    assert not (tmp_path / "out").exists()
    record("convert megatron-to-hf of a checkpoint missing a shard", err, secs,
           "nothing (no output directory written)")


def test_export_and_gad_on_missing_runs_say_what_to_do(tmp_path):
    gad = [sys.executable, "-m", "gad_megatron"]
    err, _ = one_line_error([*gad, "export", "--run", str(tmp_path / "nope")])
    assert err == f"error: --run={tmp_path / 'nope'}: no such run directory"
    err, _ = one_line_error(command(tmp_path, 2, "train.stage=gad",
                                    f"train.init_from={tmp_path / 'warmup'}"))
    assert "run the warmup stage first (`make warmup`)" in err


def test_a_ctrl_c_swallowed_on_its_way_is_raised_again_at_the_step_boundary():
    from gad_megatron.trainer.safety import StopSignals

    with StopSignals() as signals:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # as a finalizer, or torch.distributed.checkpoint's exception wrapper, would
        with pytest.raises(KeyboardInterrupt):
            signals.check_interrupt()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
