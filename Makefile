# The two commands a newcomer needs: `make run` and `make test`.
VENV   := .venv
IMAGE   ?= injector:0.1.0
ENGINE  ?= docker
KUBECTL ?= kubectl
PY     := $(VENV)/bin/python
PYTHON ?= python3
DEBS   := iptables iproute2 openssl wrk util-linux

.PHONY: run test lint bench demo image deploy system-deps cluster-binaries clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/injector serve --token-file examples/ca/dev-tokens.yaml

# Debian packages the root-only tests use; installed only when we are root and they are missing.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

# The real kube-apiserver and etcd of the cluster tests, built with Go from tests/cluster/go.mod
# into ~/.cache/injector/cluster/<versions>/ (outside the work tree); only what is missing is built.
# And the Istio peers (its CA client, its injector and webhook, its injection benchmark), from
# tests/istio/go.mod into ~/.cache/injector/istio/<istio version>/<hash of our Go sources>/.
cluster-binaries:
	bash tests/cluster/build.sh
	bash tests/istio/build.sh

test: lint system-deps cluster-binaries
	$(PY) -m pytest -q -n 2

# Style, types, and the import contract (pyproject.toml): the core never imports the shell,
# and only injector/kube uses the kubernetes client.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check injector tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(VENV)/.installed system-deps cluster-binaries
	$(PY) -m bench

# An offline mesh on this machine (root): control plane and two pods in network namespaces.
demo: $(VENV)/.installed system-deps
	$(PY) -m tests.e2e.demo

# The one image for control plane, init container and sidecar (needs a container engine).
image:
	$(ENGINE) build -t $(IMAGE) .

deploy:
	$(KUBECTL) apply -k deploy/

clean:
	rm -rf $(VENV) build *.egg-info
