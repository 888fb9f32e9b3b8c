# finetune-operator — developer entry points. `make demo` and `make test` are the two commands a
# fresh machine needs; everything they depend on is installed by the targets below and cached
# outside the repository (CACHE_DIR), keyed by version, so a warm run takes seconds.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE_DIR ?= $(HOME)/.cache/finetune-operator
PYTHON ?= python3
# The virtual environment holds the dependencies only; it is keyed by pyproject.toml so a change of
# dependencies builds a fresh one, and the project itself is installed editable from this checkout.
VENV_KEY := $(shell sha256sum pyproject.toml | cut -c1-12)
VENV ?= $(CACHE_DIR)/venv-$(VENV_KEY)
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
UV := $(CACHE_DIR)/uv-tool/bin/uv
export UV_CACHE_DIR ?= $(CACHE_DIR)/uv-cache
export CACHE_DIR
export PATH := $(VENV)/bin:$(CACHE_DIR)/bin:$(PATH)

.PHONY: help venv test test-unit demo py
help:
	@echo "make demo   - bring up the local cluster and run the example FineTuneJob end to end"
	@echo "make test   - install everything and run the whole test suite (unit + real cluster)"
	@echo "make images - build the operator and trainer images with podman, cached by content hash"

venv: $(VENV)/.deps-ok
	@$(UV) pip install -q --python $(PY) --no-deps -e .

# uv resolves in seconds and keeps every wheel in its own cache (the package index here sends no
# cacheable responses, so pip would download torch again for every new environment).
$(UV):
	@echo ">> installing uv $(UV_VERSION) into $(CACHE_DIR)/uv-tool"
	$(PYTHON) -m venv $(CACHE_DIR)/uv-tool
	$(CACHE_DIR)/uv-tool/bin/pip install -q uv==$(UV_VERSION)

$(VENV)/.deps-ok: pyproject.toml | $(UV)
	@echo ">> creating Python environment in $(VENV) (first run downloads torch: a few minutes)"
	rm -rf $(VENV)
	$(UV) venv -q --seed --python $(PYTHON) $(VENV)
	$(UV) pip install -q --python $(PY) '.[dev]'
	$(UV) pip uninstall -q --python $(PY) finetune-operator
	touch $@

# Everything: unit tests, tests against the real S3 server, and tests against the real local
# cluster (started by the test session itself, stopped at its end).
test: venv cluster-build images
	$(PY) -m finetune_api.crd --check
	$(PY) -m pytest -ra

# Fast feedback without any server.
test-unit: venv
	$(PY) -m pytest -m "not cluster and not s3" -q

# The product end to end on the local cluster: chart, operator, tenant, dataset, a FineTuneJob
# watched until it ends. Leaves the cluster running; `make cluster-down` stops it.
demo: cluster-up
	@set -a && source "$${FINETUNE_CLUSTER_DIR:-$(CURDIR)/.state/cluster}/env" && set +a && \
		$(PY) scripts/demo.py

# Prints the environment's interpreter, for scripts: `$(make -s py) -m pytest ...`
py:
	@echo $(PY)

# --- Local cluster (cluster/): etcd, Kubernetes control plane, a real kubelet node (containerd,
# runc, CNI bridge) running the project's images, kwok's fake GPU nodes, CoreDNS, S3, Prometheus;
# in a network namespace and on a bridge of its own. Needs root. State in $(FINETUNE_CLUSTER_DIR)
# (default .state/cluster).
.PHONY: cluster-build cluster-up cluster-down cluster-status test-cluster

# Builds the pinned Go binaries into $(CACHE_DIR)/tools (linked in $(CACHE_DIR)/bin) and installs
# Debian's prometheus, pushgateway, containerd, runc, CNI plugins, dataset-fashion-mnist and lua5.1
# if missing. Cold: ~50 min on 2 busy cores; warm: under a second.
cluster-build:
	@cluster/build.sh

cluster-up: cluster-build venv images
	@$(PY) cluster/localcluster.py up

cluster-down:
	@$(PYTHON) cluster/localcluster.py down

cluster-status:
	@$(PYTHON) cluster/localcluster.py status

# The cluster's own smoke tests (the session starts a private cluster, or uses the one named by
# FINETUNE_CLUSTER_ENV=.state/cluster/env after `make cluster-up`).
test-cluster: venv cluster-build images
	$(PY) -m pytest -q tests/cluster

# --- Images (cluster/images.sh): both Dockerfile targets built with Debian's podman on a Python
# base made with mmdebstrap, tagged localhost/finetune-{operator,trainer}:<content hash> and saved
# as archives containerd imports; $(CACHE_DIR)/images/images.env names them. Cold: minutes (the
# trainer's wheels are 3 GB); an unchanged tree: seconds.
.PHONY: images
images:
	@cluster/images.sh build
