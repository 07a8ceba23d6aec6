# One target per stage; every target sets the environment up first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup test test-gpu bench clean

setup: $(STAMP)

# torch is installed alone and first, pinned to the CPU build: installing it together with
# packages that merely require "torch" would let pip choose the CUDA build from the index.
$(STAMP): pyproject.toml requirements/cpu.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==2.13.0"
	$(PY) -c "import torch, sys; sys.exit('CUDA torch was installed on a CPU setup' if torch.version.cuda else 0)"
	$(PIP) install --quiet -r requirements/cpu.lock
	$(PIP) install --quiet --no-deps -e .
	@if $(PIP) list 2>/dev/null | grep -qi '^nvidia-'; then echo "error: CUDA packages were pulled into $(VENV)"; exit 1; fi
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
