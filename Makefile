# One-command entry points (README "Quick start").
# `make demo`  creates .venv if needed and runs the echo server + client end to end.
# `make test`  creates .venv if needed, then runs ruff, mypy --strict, the API reference build and the whole pytest suite.
# `make docs`  builds the API reference from the docstrings into build/api/ (pdoc; warnings are errors).
# `make bench` runs every benchmark and writes docs/BENCHMARKS.md (`make bench-quick` for a smoke run).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck pytest docs bench bench-quick fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(PY) -m ruff check src tests examples pathlab bench docs/build_api.py
	$(PY) -m ruff format --check src tests examples pathlab bench docs/build_api.py

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest

# The API reference (docs/API.md says what is in it); about three seconds.
docs: $(STAMP)
	$(PY) -W error docs/build_api.py build/api

test: lint typecheck docs pytest

# The in-process subset (no subprocesses, namespaces or Rust peers), for quick iteration.
test-fast: $(STAMP)
	$(PY) -m pytest -m 'not subprocess and not faults and not interop'

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

fuzz: $(STAMP)
	$(PY) -m tests.fuzz_wire --count 1000000

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .mypy_cache .pytest_cache .ruff_cache
