# Two commands matter: `make demo` and `make test`. Both set up what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BQVENV := .venv-bqemu
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
BQEMU_PKGS := bqemulator==1.4.0 numpy duckdb-extension-spatial==1.5.5 duckdb-extension-avro==1.5.5
PYTEST_ARGS ?=

.PHONY: install demo test lint model bench clean

install: $(VENV)/.installed $(BQVENV)/.installed

# CPU torch goes in first so that `torch>=…` in setup.py is already satisfied (no CUDA download).
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[local,train,dev]'
	touch $@

# bqemulator pins duckdb, so it lives in a virtualenv of its own; the stack copies the DuckDB
# extensions from these wheels so that nothing is downloaded when the emulator starts.
$(BQVENV)/.installed:
	test -x $(BQVENV)/bin/python || $(PYTHON) -m venv $(BQVENV)
	$(BQVENV)/bin/python -m pip install -q $(BQEMU_PKGS)
	touch $@

demo: install
	$(VENV)/bin/tilestream demo

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

model: $(VENV)/.installed
	$(VENV)/bin/tilestream model build

bench: install
	$(PY) bench/run.py

clean:
	rm -rf .tilestream build *.egg-info
