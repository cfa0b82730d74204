# The two commands a new user needs:  `make run` (the operator on the local simulated
# cluster) and `make test` (everything CI runs). Both install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
UV      := $(VENV)/bin/uv
# torch/ray/deepspeed are only needed by the worker; `make EXTRAS=dev venv` skips them.
# eval: lm-evaluation-harness and locust, the client tools the worker tests and bench use.
EXTRAS  ?= worker,dev,eval
PYTEST_ARGS ?=
export KUBECONFIG ?= $(CURDIR)/.cluster/kubeconfig

.PHONY: help venv system-deps binaries lint unit test test-unit test-tools test-worker test-integration test-e2e run \
        operator cluster-up cluster-down cluster-status serve-local generate bench

help:
	@echo "make run            local cluster + CRD + operator + a sample that serves (then asks it)"
	@echo "make run OPERATOR=helm   the same with the operator installed by the Helm chart, as a pod"
	@echo "make test           install everything, lint, and run every test (what CI runs)"
	@echo "make cluster-up     start the local control plane (kubeconfig: .cluster/kubeconfig)"
	@echo "make cluster-down   stop it and remove its state"
	@echo "make operator       run the operator in the foreground against \$$KUBECONFIG"
	@echo "make serve-local    run the worker's Ray Serve app on this machine (tiny model)"
	@echo "make generate       regenerate crds/, the chart's CRD copy and docs/reference.md"
	@echo "make bench          run the benchmarks in bench/, write docs/performance.md"

# uv installs from its cache in seconds once torch's multi-GB wheels were fetched once;
# the cache lives outside the repo (~/.cache/uv), so fresh clones reuse it.
$(VENV)/.installed-$(EXTRAS): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check 'uv==0.13.9'
	$(UV) pip install --python $(PY) -e '.[$(EXTRAS)]'
	@touch $@

venv: $(VENV)/.installed-$(EXTRAS)

system-deps:
	@bash hack/install-system-deps.sh

binaries: venv system-deps
	$(PY) -m dsi_localcluster build

cluster-up: venv system-deps
	$(PY) -m dsi_localcluster up

cluster-down:
	@if [ -x $(PY) ]; then $(PY) -m dsi_localcluster down; else echo "no venv: nothing was started"; fi

cluster-status: venv
	$(PY) -m dsi_localcluster status

# The pydantic spec model is the single source: it generates crds/, the chart's CRD copy
# and docs/reference.md. Unit tests fail when any of them drifts.
generate: venv
	$(PY) -m dsi_operator.api.crd --write
	$(PY) docs/gen_reference.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy operator/dsi_operator worker/dsi_worker localcluster/dsi_localcluster

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-tools: binaries
	$(PY) -m pytest tests/tools $(PYTEST_ARGS)

test-worker: venv
	$(PY) -m pytest tests/worker $(PYTEST_ARGS)

test-integration: binaries
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: binaries
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# Every tier (lint, unit, tools, worker, integration, e2e), cheapest first, overlapped where it pays;
# a table of each tier's wall time at the end (hack/test_tiers.py). TIERS=unit,tools for a subset.
test: venv binaries
	$(PY) hack/test_tiers.py $(if $(TIERS),--only $(TIERS)) $(PYTEST_ARGS)

operator: venv
	$(PY) -m dsi_operator

serve-local: venv
	$(PY) -m dsi_worker.local $(ARGS)

run: cluster-up
	$(PY) -m dsi_localcluster.run $(if $(OPERATOR),--operator $(OPERATOR)) $(ARGS)

# Each benchmark writes its figures to bench/results/<name>.json (git-ignored, cleared first so
# that the page shows this run only); bench/report.py renders docs/performance.md and its plots.
# A failing benchmark stops the target before the page is written.
BENCH_RESULTS := bench/results

bench: binaries
	rm -f $(BENCH_RESULTS)/*.json
	$(PY) bench/bench_operator.py --json $(BENCH_RESULTS)/bench_operator.json
	$(PY) bench/bench_side_by_side.py --json $(BENCH_RESULTS)/bench_side_by_side.json
	$(PY) bench/bench_worker.py --json $(BENCH_RESULTS)/bench_worker.json
	$(PY) bench/bench_ranks_per_pod.py --json $(BENCH_RESULTS)/bench_ranks_per_pod.json
	$(PY) bench/bench_batch.py
	$(PY) bench/bench_sharded_load.py
	$(PY) bench/report.py --results $(BENCH_RESULTS)
