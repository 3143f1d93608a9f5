# Two commands matter: `make demo` and `make test`. Both set up what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BQVENV := .venv-bqemu
# The torch the worker images pin, in a venv of its own: every shipped model must load and score
# under exactly it (tests/test_torch_parity.py). Read from the Dockerfile, so a change there is
# what the test checks; its CPU build is the same version's.
IMAGEVENV := .venv-image
IMAGE_TORCH := $(shell sed -n 's/^ARG TORCH_VERSION=//p' templates/Dockerfile)
PY := $(VENV)/bin/python
# CI's torch: setup.py's pin, read here, not written again (its CPU build).
TORCH_CPU := torch==$(shell sed -n 's/^TORCH_VERSION = "\(.*\)"$$/\1/p' setup.py)
BQEMU_PKGS := bqemulator==1.4.0 numpy duckdb-extension-spatial==1.5.5 duckdb-extension-avro==1.5.5
# checkov scans templates/terraform (docs/deploy.md). It pins much of what the project also
# uses (packaging, networkx, boto3), so it lives in a venv of its own, like bqemulator.
CHECKOVVENV := .venv-checkov
CHECKOV_PKG := checkov==3.3.30
PYTEST_ARGS ?=
# The map's web map library (pipeline/map): Leaflet from npm, pinned by version and sha512 in
# pipeline/map/leaflet.lock, unpacked into the package at build time (not committed).
MAP_VENDOR := pipeline/map/static/vendor/leaflet

.PHONY: install demo test lint iac model bench reliability iam clean vendor browser

install: $(VENV)/.installed $(BQVENV)/.installed $(IMAGEVENV)/.torch-$(IMAGE_TORCH) \
	$(CHECKOVVENV)/.$(CHECKOV_PKG) vendor browser

# CPU torch goes in first so that `torch>=…` in setup.py is already satisfied (no CUDA download).
$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[ops,local,train,dev,map]'
	touch $@

# bqemulator pins duckdb, so it lives in a virtualenv of its own; the stack copies the DuckDB
# extensions from these wheels so that nothing is downloaded when the emulator starts.
$(BQVENV)/.installed:
	test -x $(BQVENV)/bin/python || $(PYTHON) -m venv $(BQVENV)
	$(BQVENV)/bin/python -m pip install -q $(BQEMU_PKGS)
	touch $@

$(CHECKOVVENV)/.$(CHECKOV_PKG):
	test -x $(CHECKOVVENV)/bin/python || $(PYTHON) -m venv $(CHECKOVVENV)
	$(CHECKOVVENV)/bin/python -m pip install -q "$(CHECKOV_PKG)"
	rm -f $(CHECKOVVENV)/.checkov==*
	touch $@

$(IMAGEVENV)/.torch-$(IMAGE_TORCH): templates/Dockerfile
	test -x $(IMAGEVENV)/bin/python || $(PYTHON) -m venv $(IMAGEVENV)
	$(IMAGEVENV)/bin/python -m pip install -q "torch==$(IMAGE_TORCH)" numpy
	rm -f $(IMAGEVENV)/.torch-*
	touch $@

vendor: $(MAP_VENDOR)/leaflet.js

$(MAP_VENDOR)/leaflet.js: pipeline/map/leaflet.lock pipeline/map/vendor.sh
	pipeline/map/vendor.sh

# The browser test (tests/test_map.py) drives Debian's Chromium through Playwright; no browser
# is downloaded by Playwright.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

demo: install
	$(VENV)/bin/tilestream demo

test: install
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory iac
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Every finding fixed or skipped inline with its reason (#checkov:skip=CKV_...:why); offline.
iac: $(CHECKOVVENV)/.$(CHECKOV_PKG)
	$(CHECKOVVENV)/bin/checkov -d templates/terraform --framework terraform --compact --quiet \
	  --skip-download

model: $(VENV)/.installed
	$(VENV)/bin/tilestream model build

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py

# templates/iam/needs.json and docs/deploy.md's grants table from a full recorded test run,
# written only when that whole run passed (tests/conftest.py); a selection writes nothing.
iam: install
	TILESTREAM_IAM_NEEDS=templates/iam/needs.json $(PY) -m pytest $(PYTEST_ARGS)

# docs/reliability.md from a real run of the reliability tests (never from `make test`).
reliability: install
	TILESTREAM_RELIABILITY_DOC=docs/reliability.md $(PY) -m pytest tests/test_reliability.py \
	  tests/test_ledger.py tests/test_bluegreen.py tests/test_rollback_rule.py

clean:
	rm -rf .tilestream build *.egg-info
