# stockhold: `make run` serves (embedded Redis unless STOCKHOLD_REDIS_URL is set), `make test` tests.
# Both create .venv, install, and generate the gRPC stubs as needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install
STUBS  := src/stockhold/v1/inventory_pb2.py
PROTOS := $(shell find proto -name '*.proto')
PYTEST_ARGS ?=
BENCH_ARGS ?=
LOADTEST_ARGS ?=
LOADBENCH_ARGS ?=
# The compiled hot path (native/*.pyx), built in place next to its pure-Python twin.
EXT_SUFFIX := $(shell $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
NATIVE_SRC := $(wildcard native/*.pyx native/*.pxd)
NATIVE_SO  := src/stockhold/_resolver_c$(EXT_SUFFIX) src/stockhold/_contention_c$(EXT_SUFFIX)

.PHONY: all install stubs native run test test-cluster lint fmt clean bench loadtest loadbench bench-cluster

all: lint test

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(STUBS): $(STAMP) $(PROTOS) scripts/gen_protos.py
	$(BIN)/python scripts/gen_protos.py

# setup.py build_ext only warns when it cannot compile (stockhold then runs pure Python);
# make test fails in that case (tests/test_resolver_impls.py and test_contention_impls.py check).
$(NATIVE_SO) &: $(STAMP) $(NATIVE_SRC) setup.py
	$(BIN)/python setup.py -q build_ext --inplace --force

native: $(NATIVE_SO)

install: $(STAMP) $(STUBS) native

stubs: $(STUBS)

run: install
	$(BIN)/stockhold serve $(ARGS)

test: install
	bash scripts/ensure-redis.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The long Redis Cluster runs (failover repeated, resharding of many slots); `make test` runs
# one short instance of each. Figures go to bench/results/cluster_failover_<UTC>.json.
test-cluster: install
	bash scripts/ensure-redis.sh
	$(BIN)/python -m pytest -m cluster_long -s tests/test_cluster_failover.py $(PYTEST_ARGS)

# The long fuzz run of every Inventory RPC (tests/test_fuzz.py, docs/security.md "Fuzzing"):
# FUZZ_EXAMPLES generated calls per method and input kind on a standalone Redis (a fifth of
# them on a Redis Cluster); `make test` runs a few hundred per method. One line per method
# and kind (calls, seconds) goes to FUZZ_REPORT.
FUZZ_EXAMPLES ?= 3000
FUZZ_REPORT ?= fuzz-report.txt
.PHONY: fuzz
fuzz: install
	bash scripts/ensure-redis.sh
	rm -f $(FUZZ_REPORT)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_REPORT=$(abspath $(FUZZ_REPORT)) \
		$(BIN)/python -m pytest -m fuzz_long -p no:logging tests/test_fuzz.py $(PYTEST_ARGS)
	cat $(FUZZ_REPORT)

# Micro-benchmarks (pytest-benchmark), saved under .benchmarks/; compare with the last saved
# run: make bench BENCH_ARGS=--benchmark-compare
bench: install
	$(BIN)/python -m pytest bench/test_bench_resolver.py bench/test_bench_engine.py \
		bench/test_bench_hotclient.py bench/test_bench_contention.py \
		--benchmark-only --benchmark-autosave $(BENCH_ARGS)

$(VENV)/.stamp-loadtest: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,loadtest]'
	touch $@

# A short headless Locust run against a private stockhold + Redis (see loadtest/run.py).
loadtest: install $(VENV)/.stamp-loadtest
	$(BIN)/python loadtest/run.py $(LOADTEST_ARGS)

$(VENV)/.stamp-bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

# End-to-end load benchmark: private Redis + stockhold, C++ gRPC generator (docs/performance.md).
loadbench: install $(VENV)/.stamp-bench
	bash scripts/ensure-loadgen.sh
	bash bench/loadgen/build.sh
	$(BIN)/python bench/loadbench.py $(LOADBENCH_ARGS)

# Redis-tier capacity, 1 master vs 3 masters, without gRPC (issue 11; bench/README.md).
CLUSTER_BENCH_ARGS ?=
bench-cluster: install
	$(BIN)/python bench/cluster_capacity.py $(CLUSTER_BENCH_ARGS)

# Cross-slot against single-slot orders on Redis Cluster: round trips, p50/p99, orders/s, with a
# standalone reference, without gRPC (issue 11; bench/README.md).
CROSS_SLOT_ARGS ?=
.PHONY: bench-cross-slot
bench-cross-slot: install
	$(BIN)/python bench/cross_slot_cost.py $(CROSS_SLOT_ARGS)

# Event delivery (issue 12): 2,000 Reserve/s offered for 30 s to a stockhold serve whose
# subscription pushes every event to a local fake WMS; backlog, end-to-end delay, every event
# checked at the WMS (bench/README.md). DELIVERY_BENCH_ARGS='--rate 500 --seconds 10'
DELIVERY_BENCH_ARGS ?=
.PHONY: bench-delivery
bench-delivery: install
	$(BIN)/python bench/delivery_bench.py $(DELIVERY_BENCH_ARGS)

lint: install
	$(BIN)/ruff check src tests scripts bench loadtest
	$(BIN)/ruff format --check src tests scripts bench loadtest
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format src tests scripts bench loadtest
	$(BIN)/ruff check --fix src tests scripts bench loadtest

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/stockhold/v1 .pytest_cache .mypy_cache .ruff_cache
	rm -f src/stockhold/_resolver_c.*.so src/stockhold/_contention_c.*.so native/*.c
	rm -rf bench/loadgen/build
