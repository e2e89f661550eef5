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
# Stage commands call `python`: DVC must see the venv first on PATH.
DVC_ENV := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"

.PHONY: setup repro repro-paper compare plots test test-fast ui bench clean

setup: $(STAMP)

# The venv is stale whenever the pinned dependencies change.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

repro: setup
	$(DVC_ENV) $(VENV)/bin/dvc repro

# A rerun's metrics against the committed study (HEAD), within a tolerance: exit 1 beyond it.
compare: setup
	$(DVC_ENV) $(PY) -m pipelines.compare

# The paper study: the same dvc.yaml with params-paper.yaml, run in its own git worktree
# (PAPER_DIR, default ../<this folder>-paper, made from HEAD on first use) whose params.yaml is the
# paper's: this checkout's tracked files stay as they are. MLflow runs land in this store (sdn-paper).
PAPER_DIR ?= $(abspath $(CURDIR)/../$(notdir $(CURDIR))-paper)
repro-paper: setup
	@test -d "$(PAPER_DIR)" || git worktree add --detach "$(PAPER_DIR)" HEAD
	cp params-paper.yaml "$(PAPER_DIR)/params.yaml"
	cd "$(PAPER_DIR)" && $(DVC_ENV) $(CURDIR)/$(VENV)/bin/dvc repro

# The DVC plots (one chart per dataset, its models overlaid) as pages that open offline:
# dvc_plots/offline/index.html (`dvc plots show` loads Vega from a CDN). ARGS=--all adds per-run curves.
plots: setup
	$(DVC_ENV) $(PY) -m pipelines.plots $(ARGS)

# MLflow UI on the study's store, on the loopback interface only (`make ui PORT=5001` for another port).
PORT ?= 5000
ui: setup
	$(VENV)/bin/mlflow server --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" \
		--artifacts-destination "$(CURDIR)/mlartifacts" --host 127.0.0.1 --port $(PORT) --workers 1

# One pytest-xdist worker per core (`make test TEST_WORKERS=1` runs the tests one after the other);
# a test file's tests stay on one worker, which builds its module fixtures once.
TEST_WORKERS ?= $(shell nproc)
test: setup
	@$(DVC_ENV) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(DVC_ENV) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: setup
	$(PY) benchmarks/sdn_layer.py

clean:
	rm -rf $(VENV) .pytest_cache
