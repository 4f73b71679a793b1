# diffrep: `make demo` runs the main job on the shipped default, `make test` runs the tests.
# Both create .venv (torch pinned to the local wheels via requirements-local.txt) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow clean

$(VENV)/.installed: pyproject.toml requirements-local.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-local.txt
	$(PY) -m pip install -q -c requirements-local.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/diffrep demo --out out/demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) out .pytest_cache
