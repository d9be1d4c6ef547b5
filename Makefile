# Quickstart: `make demo` (install + train on the built-in phantom) and `make test` (install + test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/ssmis: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the CPU wheel first, so pip never pulls a CUDA build
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: install demo test
install: $(BIN)/ssmis

demo: install
	$(BIN)/ssmis demo --overwrite

# the suite in JOBS processes (pytest-xdist; every test runs on one thread, see tests/conftest.py)
JOBS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(JOBS)
