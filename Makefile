# flyfs — `make run` sets everything up and starts a cluster; `make test` sets up and runs the tests.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.stamp-installed
DATADIR ?= .flyfs
MOUNT   ?= ./mnt
PYTEST_ARGS ?=

.PHONY: run test test-slow test-all setup sysdeps proto bench clean

setup: sysdeps $(STAMP)

# System packages by name, only when missing. Never the `fuse` package: it removes fuse3.
sysdeps:
	@bash scripts/sysdeps.sh

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

proto: setup
	$(VPY) scripts/gen_proto.py

test: setup
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(VPY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: setup
	$(VPY) -m pytest -q -m '' $(PYTEST_ARGS)

run: setup
	$(VENV)/bin/flyfs up --data-dir $(DATADIR) --mount $(MOUNT)

bench: setup
	$(VENV)/bin/flyfs bench all --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
