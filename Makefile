# Two commands: `make demo` runs the main job on the embedded default (a local agent + kernel),
# `make test` runs the whole test suite. Both create their own virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(VENV)/.installed-demo: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q ".[demo]"
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q ".[test]"
	touch $@

demo: $(VENV)/.installed-demo
	$(PIP) install -q --no-deps --force-reinstall .
	$(VENV)/bin/colabmagic demo

test: $(VENV)/.installed-test
	$(PIP) install -q --no-deps --force-reinstall .
	cd tests && ../$(PY) -m pytest -c ../pyproject.toml --rootdir .. $(PYTEST_ARGS) .

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check colabmagic tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info
