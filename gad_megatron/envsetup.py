"""Which environment `make setup` / `make setup-gpu` builds, chosen by the torch installed.

Run as a script (`python gad_megatron/envsetup.py choose --engine vllm`) before the package
is installed, so it imports nothing of the project and no third-party package but torch.

- CPU machines (`make setup`): a fresh venv, the CPU torch wheel first, requirements/cpu.lock.
- GPU machines (`make setup-gpu`): a venv over the system site-packages, so the CUDA torch
  the machine (or its container image) already has is KEPT; then the lock of the chosen
  engine, with the installed torch pinned as a constraint so pip can never swap it. vLLM and
  SGLang pin different torch and transformers versions, hence one lock per engine; a torch
  that is not the one the engine's lock was written for is refused, naming both versions.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_ENGINES = ("vllm", "sglang")


class SetupRefused(RuntimeError):
    """The installed torch does not fit the setup path asked for."""


@dataclass(frozen=True)
class Choice:
    path: str
    """'cpu' or 'gpu'."""
    lock: str
    """The lock file to install (relative to the repository root)."""
    torch_constraint: str
    """A pip constraint line that keeps the installed torch ('' on the CPU path)."""


def lock_pins(text: str) -> dict[str, str]:
    """`name==version` lines of a lock file, by lower-case name."""
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _base(version: str) -> str:
    return version.split("+")[0]  # '2.14.0+cu128' -> '2.14.0'


def choose(path: str, torch_version: str | None, cuda: str | None, engine: str,
           locks: dict[str, dict[str, str]]) -> Choice:
    """The setup to run. `torch_version`/`cuda`: the installed torch (None: none installed;
    cuda None: a CPU build). `locks`: pins of each lock by file name."""
    if path == "cpu":
        return Choice("cpu", "requirements/cpu.lock", "")
    if engine not in GPU_ENGINES:
        raise SetupRefused(f"setup-gpu: ENGINE must be one of {GPU_ENGINES}, got {engine!r}")
    if torch_version is None:
        raise SetupRefused("setup-gpu keeps the machine's CUDA torch, and none is installed "
                           "(use a CUDA PyTorch image, or `make setup` for CPU)")
    if cuda is None:
        raise SetupRefused(f"setup-gpu needs a CUDA torch; the installed torch "
                           f"{torch_version} is a CPU build (use `make setup` on CPU)")
    lock = f"requirements/gpu-{engine}.lock"
    want = locks[lock].get("torch")
    if want is not None and _base(torch_version) != want:
        raise SetupRefused(f"{engine} {locks[lock].get(engine, '')} is locked with torch "
                           f"{want}; this machine has torch {torch_version} (CUDA {cuda})")
    return Choice("gpu", lock, f"torch=={torch_version}")


def _installed_torch() -> tuple[str | None, str | None]:
    try:
        import torch
    except ImportError:
        return None, None
    return torch.__version__, torch.version.cuda


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["choose"])
    parser.add_argument("--path", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--constraints", help="write the torch constraint to this file")
    args = parser.parse_args(argv)
    locks = {f"requirements/{p.name}": lock_pins(p.read_text())
             for p in (ROOT / "requirements").glob("*.lock")}
    try:
        choice = choose(args.path, *_installed_torch(), args.engine, locks)
    except SetupRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.constraints:
        Path(args.constraints).write_text(choice.torch_constraint + "\n")
    print(choice.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
