# Two entry points that work on a fresh machine with Python 3.11:
#   make demo   sets up .venv and runs the main job on the embedded default config
#   make test   sets up .venv (with test extras) and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow lint format venv venv-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

demo: venv
	$(PY) -m hdb_jax.train --config configs/demo.py

test: venv-test lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 tests

# The tests marked slow (the reduced SD 1.5 scale benchmark, ~7 minutes on 2 cores).
test-slow: venv-test
	$(PY) -m pytest -q -m slow tests

# One formatter and one linter; `make test` (and so CI) fails on unformatted or lint-failing code.
lint: venv-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: venv-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs
