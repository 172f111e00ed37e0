# lmskv build, run and test entry points. `make run` and `make test` set up
# what is missing, build, and run. Cargo's target dir lives outside the clone
# so repeated runs (and fresh clones) reuse the compiled RocksDB.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/lmskv-target
CARGO ?= cargo
NODES ?= 3
DATA_DIR ?= ./lmskv-data
BASE_PORT ?= 7001

.PHONY: all setup build build-release run test fmt fmt-check lint unit-test integration-test clean help

all: build

help:
	@echo "make run    - build (release) and start a local $(NODES)-node cluster (Ctrl-C stops it)"
	@echo "make test   - format check, clippy, unit and integration tests"
	@echo "make build  - debug build of every binary"
	@echo "make fmt    - format the code"

setup:
	@./scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

build-release: setup
	$(CARGO) build --release --workspace --bins

run: build-release
	@echo "Starting a local $(NODES)-node lmskv cluster in $(DATA_DIR) (ports $(BASE_PORT)+)."
	$(CARGO_TARGET_DIR)/release/lmskv local up --nodes $(NODES) --data-dir $(DATA_DIR) --base-port $(BASE_PORT) \
		--node-bin $(CARGO_TARGET_DIR)/release/lmskv-node

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint: setup
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# One `cargo test` over the whole workspace, so it reuses the build above.
# Cluster tests start real processes; one test at a time keeps 2-core machines honest.
unit-test integration-test: build
	$(CARGO) test --workspace -- --test-threads=1

test: setup fmt-check lint build integration-test
	@echo "make test: all checks passed"

clean:
	$(CARGO) clean

# Chaos runs: workloads against a real cluster under kill and pause faults,
# checked for linearizability and lost writes; the report lands in bench/.
.PHONY: chaos chaos-short
chaos: build
	@mkdir -p bench
	$(CARGO) run -p lmskv-tests --bin lmskv-chaos -- --nodes 5 --duration 1800s --report bench/chaos-report.json

chaos-short: build
	@mkdir -p bench
	$(CARGO) run -p lmskv-tests --bin lmskv-chaos -- --nodes 3 --duration 30s --report bench/chaos-report.json
