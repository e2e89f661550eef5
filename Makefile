# make repro  — set up .venv if needed, then run the embedded study with DVC.
# make test   — set up .venv if needed, then run the whole test suite.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: setup repro repro-paper test test-fast ui bench clean

setup: $(STAMP)

# The venv is stale whenever the pinned dependencies change.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

repro: setup
	$(VENV)/bin/dvc repro

test: setup
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) benchmarks/sdn_layer.py

clean:
	rm -rf $(VENV) .pytest_cache
