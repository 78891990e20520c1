# Two commands for a fresh clone: `make train` (demo run) and `make test` (whole suite).
# Each creates .venv on first use and reinstalls only when a requirements file changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test setup setup-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

train: setup
	$(BIN)/python -m bco_jax.train $(ARGS)

test: setup-test
	$(BIN)/python -m pytest tests $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
