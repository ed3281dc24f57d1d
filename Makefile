# Two quick-start commands: `make run` (the main job on the demo VM) and `make test`.
# Each creates .venv from pyproject.toml on first use (needs Python 3.11+).

VENV    ?= .venv
PYTHON  ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
             command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test lint format bench server stop deploy worker

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11+ is required (python3.11 or newer on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@# an editable install leaves no bytecode: compile once so no command pays for it at start-up
	$(PY) -m compileall -q hypersdk providers flows tasks deployments >/dev/null
	@touch $@

run: $(STAMP)
	$(VENV)/bin/hyperctl demo

# two pytest workers (pytest-xdist), one per core; a test file stays on one worker, so its
# module fixtures (chains, servers) are built once. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m benchmarks.pipeline

# Prefect server, deployments and a worker (see README "Prefect UI and deployments").
# `make run` starts a local server in the background on first use (docs/prefect-local.md);
# `make stop` stops that one (never a server hyperctl did not start, such as `make server`'s).
PREFECT_API_URL ?= http://127.0.0.1:4200/api
server: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

stop: $(STAMP)
	$(VENV)/bin/hyperctl server stop

deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API_URL) $(PY) -m deployments.bootstrap

# the venv first on PATH: fleet-member runs start `python -m prefect.engine` (prefect.yaml)
worker: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" PREFECT_API_URL=$(PREFECT_API_URL) $(VENV)/bin/prefect worker start --pool hypersdk-local
