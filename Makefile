# Taskbox. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# The lock as constraints: the runtime dependencies at exactly the versions the image
# installs (tests/unit/test_lock.py fails on any drift); the dev tools resolve freely.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## create .venv and install Taskbox with its dev tools (runtime dependencies as locked)

.PHONY: migrate
migrate: $(STAMP) ## create the database if missing and apply migrations (DATABASE_URL)
	$(BIN)/taskbox migrate

.PHONY: dev
dev: migrate ## run api, relay and consumer locally until Ctrl-C
	$(BIN)/python -m taskbox.runtime.dev

# Operator commands (see README, "Operating Taskbox"); ARGS passes their options.
.PHONY: roles
roles: $(STAMP) ## least-privilege roles for api, relay, consumer: make roles ARGS='--dry-run'
	$(BIN)/taskbox roles $(ARGS)

.PHONY: replay
replay: $(STAMP) ## re-send tasks through the outbox: make replay ARGS='--stale-for 10m --dry-run'
	$(BIN)/taskbox replay $(ARGS)

.PHONY: status
status: $(STAMP) ## one screen: tasks by status, outbox backlog and lag, queue depths
	$(BIN)/taskbox status $(ARGS)

.PHONY: cleanup
cleanup: $(STAMP) ## one retention sweep now (OUTBOX_RETENTION, TASK_RETENTION)
	$(BIN)/taskbox cleanup $(ARGS)

.PHONY: run
run: ## build and start the container stack (needs a Docker engine)
	docker compose up --build

.PHONY: stop
stop: ## stop the container stack
	docker compose down

.PHONY: logs
logs: ## follow the container stack's logs
	docker compose logs -f

.PHONY: test
test: $(STAMP) ## run every test (the fault suite included) against the local Postgres and RabbitMQ
	$(BIN)/pytest

.PHONY: test-faults
test-faults: $(STAMP) ## the fault-injection suites: chaos run, crash windows, Postgres crash and failover, then the RabbitMQ cluster's (4 to 8 min)
	$(BIN)/pytest tests/faults
	$(BIN)/pytest -m cluster tests/cluster

.PHONY: test-cluster
test-cluster: $(STAMP) ## its own three-node RabbitMQ cluster on loopback: leader kill, partition, rolling restart under load (2 to 6 min)
	$(BIN)/pytest -m cluster tests/cluster

.PHONY: test-failover
test-failover: $(STAMP) ## Postgres primary failover under load: own primary + synchronous standby, kill -9, promote; a server turning read-only (under a minute)
	$(BIN)/pytest tests/faults/test_postgres_failover.py

.PHONY: fuzz
fuzz: $(STAMP) ## schemathesis against the API on a fresh database (three to four minutes); FUZZ_ARGS='--seed 1'
	$(BIN)/python -m tests.fuzz.run $(FUZZ_ARGS)

# The peers of the benchmark (pgqueuer, Celery, procrastinate) in a venv of their own,
# pinned in bench/peers/requirements.txt: their dependencies never meet Taskbox's locked
# ones. Built from PyPI; without it `make bench` stops and says so (it never skips them).
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP): bench/peers/requirements.txt
	rm -rf $(PEERS_VENV) && $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet --no-deps -r bench/peers/requirements.txt || \
		{ echo "could not build $(PEERS_VENV) from bench/peers/requirements.txt: the peer benchmarks need PyPI"; exit 1; }
	$(PEERS_VENV)/bin/pip check
	touch $(PEERS_STAMP)

.PHONY: peers-venv
peers-venv: $(PEERS_STAMP) ## the benchmark peers' own venv (.venv-peers: pgqueuer, Celery, procrastinate)

.PHONY: bench
bench: $(STAMP) $(PEERS_STAMP) ## run the benchmarks against same-run baselines and peers (about 19 minutes; needs wrk)
	@command -v wrk >/dev/null || { echo "installing wrk (Debian package)"; apt-get install -y -qq wrk >/dev/null || \
		{ echo "wrk is missing: install it (apt-get install wrk)"; exit 1; }; }
	$(BIN)/python -m bench $(BENCH_ARGS)

.PHONY: bench-pg
bench-pg: $(STAMP) ## what Postgres spends per task (WAL bytes, commits, index entries), on a Postgres of its own; BENCH_PG_ARGS='--tasks 5000'
	$(BIN)/python -m bench.pg_cost $(BENCH_PG_ARGS)

.PHONY: bench-quick
bench-quick: $(STAMP) ## the benchmarks with tiny counts: a check that the suite still runs
	$(MAKE) bench BENCH_ARGS=--quick

.PHONY: lint
lint: $(STAMP) lint-containers ## ruff, mypy, the layering contracts (lint-imports), hadolint, the compose file
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

.PHONY: lint-containers
lint-containers: $(STAMP) ## hadolint the Dockerfile; validate docker-compose.yml (no engine needed)
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --schemafile tests/containers/compose-spec.json docker-compose.yml
	@if docker compose version >/dev/null 2>&1; then \
		echo "docker compose config --quiet"; docker compose config --quiet; \
	else \
		echo "docker compose (v2) not installed: skipped 'docker compose config'"; \
	fi

.PHONY: lock
lock: ## re-pin the runtime dependencies the image installs (requirements.lock)
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet .
	{ echo "# Exact versions of Taskbox's runtime dependencies, installed by the Dockerfile."; \
	  echo "# Regenerate: make lock"; \
	  .lock-venv/bin/pip freeze --exclude taskbox; } > requirements.lock
	rm -rf .lock-venv

.PHONY: format
format: $(STAMP) ## apply ruff's formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: clean
clean: ## remove the virtual environment and caches
	rm -rf $(VENV) $(PEERS_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .schemathesis .import_linter_cache
