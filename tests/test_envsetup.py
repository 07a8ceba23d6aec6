"""The setup path is chosen by the torch installed (issue 14, defect 7): `make test-gpu` used
to depend on `setup`, which installs the CPU torch and refuses CUDA packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gad_megatron.envsetup import Choice, SetupRefused, choose, lock_pins

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {f"requirements/{p.name}": lock_pins(p.read_text())
         for p in (ROOT / "requirements").glob("*.lock")}


@pytest.mark.parametrize("path,torch_v,cuda,engine,want", [
    ("gpu", "2.14.0+cu128", "12.8", "vllm",
     Choice("gpu", "requirements/gpu-vllm.lock", "torch==2.14.0+cu128")),
    ("gpu", "2.14.1", "12.9", "sglang",
     Choice("gpu", "requirements/gpu-sglang.lock", "torch==2.14.1")),
    ("cpu", "2.13.0+cpu", None, "vllm", Choice("cpu", "requirements/cpu.lock", "")),
    ("cpu", None, None, "sglang", Choice("cpu", "requirements/cpu.lock", "")),
])
def test_choice_table(path, torch_v, cuda, engine, want):
    assert choose(path, torch_v, cuda, engine, LOCKS) == want


@pytest.mark.parametrize("torch_v,cuda,engine,message", [
    ("2.13.0+cpu", None, "vllm", "the installed torch 2.13.0+cpu is a CPU build"),
    (None, None, "vllm", "none is installed"),
    ("2.14.0+cu128", "12.8", "sglang",
     "sglang 0.5.23 is locked with torch 2.14.1; this machine has torch 2.14.0+cu128"),
    ("2.14.1", "12.8", "vllm", "vllm 0.33.0 is locked with torch 2.14.0"),
    ("2.14.1", "12.8", "hf", "ENGINE must be one of"),
])
def test_refusals_name_the_versions(torch_v, cuda, engine, message):
    with pytest.raises(SetupRefused, match=message.replace("+", r"\+")):
        choose("gpu", torch_v, cuda, engine, LOCKS)


def test_locks_hold_the_engines_requirements():
    vllm, sgl = LOCKS["requirements/gpu-vllm.lock"], LOCKS["requirements/gpu-sglang.lock"]
    assert (vllm["torch"], vllm["vllm"]) == ("2.14.0", "0.33.0")
    assert tuple(int(x) for x in vllm["transformers"].split(".")[:2]) < (5, 21)
    assert (sgl["torch"], sgl["sglang"], sgl["transformers"]) == ("2.14.1", "0.5.23", "5.19.0")
    for lock in (vllm, sgl):  # everything else as on CPU (one tested Megatron)
        assert lock["megatron-core"] == LOCKS["requirements/cpu.lock"]["megatron-core"]


def test_on_this_machine_the_installed_torch_decides():
    out = subprocess.run([sys.executable, str(ROOT / "gad_megatron/envsetup.py"), "choose",
                          "--path", "gpu", "--engine", "vllm"], capture_output=True, text=True)
    if torch.version.cuda is None:
        assert out.returncode == 2 and "is a CPU build" in out.stderr
    else:
        assert out.returncode == 0 or "is locked with torch" in out.stderr


def test_make_test_gpu_goes_through_setup_gpu_not_the_cpu_setup():
    out = subprocess.run(["make", "-n", "test-gpu", "GPU_VENV=/nonexistent-venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "envsetup.py choose --path gpu" in out and "--system-site-packages" in out
    assert "torch==2.13.0" not in out and "cpu.lock" not in out
    assert "-m pytest -q -m gpu" in out
