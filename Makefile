# lmskv build, run and test entry points. `make run` and `make test` set up
# what is missing, build, and run. Cargo's target dir lives outside the clone
# so repeated runs (and fresh clones) reuse the compiled RocksDB.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/lmskv-target
CARGO ?= cargo
NODES ?= 3
DATA_DIR ?= ./lmskv-data
BASE_PORT ?= 7001
API_LISTEN ?= 127.0.0.1:8080
SCHEMATHESIS_VENV ?= $(HOME)/.cache/lmskv-schemathesis
SCHEMATHESIS_VERSION ?= 4.32.5
FUZZ_SECONDS ?= 120
# Debug builds (build, lint, tests) carry the node's fail points, which the
# fail point tests drive through FAILPOINTS; one feature set for all three so
# they share compiled artifacts. Release builds (`make run`, `make bench`) do not.
TEST_FEATURES ?= --features lmskv-node/failpoints

.PHONY: all setup build build-release run test fmt fmt-check lint unit-test integration-test clean help bench bench-smoke

all: build

help:
	@echo "make run    - build (release), start a local $(NODES)-node cluster and the LMS API with demo data (Ctrl-C stops them)"
	@echo "make api-fuzz - run schemathesis against the LMS API's OpenAPI document ($(FUZZ_SECONDS)s)"
	@echo "make test   - format check, clippy, unit and integration tests"
	@echo "make build  - debug build of every binary and test"
	@echo "make fmt    - format the code"
	@echo "make bench  - lmskv vs etcd (YCSB A-F, put, get), report in bench/report.md"
	@echo "make sim    - deterministic simulation over SIM_SEEDS seeds (default 1000); SEED=N replays one"
	@echo "make chaos  - 30-minute chaos run, 5 nodes, every nemesis (make chaos-short: 30 s); report in bench/chaos-report.json"

setup:
	@./scripts/setup.sh

# Binaries and test targets in one invocation: building test targets turns
# on the features that dev-dependencies ask of shared crates (tower, hyper-util
# and others, through reqwest), so a build of the binaries alone would compile
# every crate above them a second time for `cargo test`.
build: setup
	$(CARGO) build --workspace --bins --tests $(TEST_FEATURES)

build-release: setup
	$(CARGO) build --release --workspace --bins

# The cluster runs in the background, the LMS API (with its demo data) in the
# foreground; Ctrl-C stops both.
run: build-release
	NODES=$(NODES) DATA_DIR=$(DATA_DIR) BASE_PORT=$(BASE_PORT) API_LISTEN=$(API_LISTEN) \
		./scripts/run-local.sh --bin-dir $(CARGO_TARGET_DIR)/release

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint: setup
	$(CARGO) clippy --workspace --all-targets $(TEST_FEATURES) -- -D warnings

# One `cargo test` over the whole workspace, with the build's features, so it
# compiles nothing more than the examples.
# Cluster tests start real processes; one test at a time keeps 2-core machines honest.
unit-test integration-test: build
	$(CARGO) test --workspace $(TEST_FEATURES) -- --test-threads=1

test: setup fmt-check lint build integration-test bench-smoke api-fuzz-short
	@echo "make test: all checks passed"

clean:
	$(CARGO) clean

# Chaos runs: the register, set and bank workloads against a real cluster
# under kill, pause, partition, leader-transfer, split, replica-move and
# clock-skew nemeses, checked for linearizability, lost writes and the bank's
# total; the report lands in bench/. CHAOS_NETWORK=auto runs every node in its
# own network namespace as root (partitions on IP packets), behind TCP proxies
# otherwise; netns or proxy forces one.
CHAOS_NETWORK ?= auto
.PHONY: chaos chaos-short
chaos: build
	@mkdir -p bench
	$(CARGO) run -p lmskv-tests --bin lmskv-chaos -- --nodes 5 --duration 1800s --network $(CHAOS_NETWORK) --report bench/chaos-report.json

chaos-short: build
	@mkdir -p bench
	$(CARGO) run -p lmskv-tests --bin lmskv-chaos -- --nodes 4 --duration 30s --network $(CHAOS_NETWORK) --report bench/chaos-report.json

# Deterministic simulation (crate lmskv-sim): 5 simulated hosts running the
# node's real replica code over turmoil's network, with seeded partitions,
# connection loss, crashes and replica moves; SIM_SEEDS seeds from SIM_FIRST,
# one line per seed. `make sim SEED=N` replays one seed (a failure prints its
# own). A short version (16 seeds and the regression seeds) runs in `make test`
# as lmskv-sim's tests.
SIM_SEEDS ?= 1000
SIM_FIRST ?= 1
.PHONY: sim
sim: build
	$(CARGO_TARGET_DIR)/debug/lmskv-sim $(if $(SEED),--seed $(SEED),--seeds $(SIM_SEEDS) --first $(SIM_FIRST))

# lmskv against etcd on this machine: 3 members each on loopback, every
# workload at 1/16/64/256 clients in interleaved pairs. BENCH_* variables
# (see benches/src/suite/mod.rs) shorten it, e.g.
#   BENCH_DURATION=10s BENCH_WORKLOADS=put,get make bench
# The same release build as `make run` (a narrower -p selection unifies
# features differently and would compile RocksDB a second time).
bench: build-release
	$(CARGO_TARGET_DIR)/release/lmskv-bench-suite

# The same suite for a second per workload on the debug build, as a smoke
# test of both targets (no timing is checked); its output goes to a temp dir.
bench-smoke: build
	@out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && \
	BENCH_OUT="$$out" BENCH_DURATION=1s BENCH_WARMUP=500ms BENCH_PAIRS=1 \
	BENCH_CLIENTS=4 BENCH_YCSB_CLIENTS=4 BENCH_RECORDS=500 BENCH_WORKLOADS= BENCH_TARGETS= \
	$(CARGO_TARGET_DIR)/debug/lmskv-bench-suite && \
	test -s "$$out/report.md" && test -s "$$out/throughput.png" && test -s "$$out/p99.png" && \
	echo "bench-smoke: both targets ran every workload"

# Schemathesis fuzzes every operation of /openapi.json on a throwaway local
# cluster and fails on any 5xx. Installed into its own virtualenv when missing.
.PHONY: schemathesis api-fuzz api-fuzz-short
schemathesis:
	@if [ ! -x $(SCHEMATHESIS_VENV)/bin/schemathesis ]; then \
		echo "installing schemathesis $(SCHEMATHESIS_VERSION) into $(SCHEMATHESIS_VENV)"; \
		python3 -m venv $(SCHEMATHESIS_VENV) && \
		$(SCHEMATHESIS_VENV)/bin/pip install -q "schemathesis==$(SCHEMATHESIS_VERSION)"; \
	fi

api-fuzz: build schemathesis
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	DATA_DIR=$$tmp BASE_PORT=7301 API_LISTEN=127.0.0.1:8301 SCHEMATHESIS=$(SCHEMATHESIS_VENV)/bin/schemathesis \
		./scripts/run-local.sh --bin-dir $(CARGO_TARGET_DIR)/debug --fuzz $(FUZZ_SECONDS)

api-fuzz-short:
	$(MAKE) api-fuzz FUZZ_SECONDS=30
