# sd3serve: `make demo` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build on this kind of machine; GPU users install their CUDA build of torch first
# and run `make venv TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
REDIS_PORT ?= 6379

.PHONY: venv demo lint format test test-fast system-deps redis screenshot clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# promtool (monitoring config checks) and Chromium (playground browser test) come from Debian.
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v chromium >/dev/null; then \
	  echo "installing Debian packages: prometheus chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium >/dev/null; \
	fi

# The tests use the machine's Redis at 127.0.0.1:$(REDIS_PORT); start one if none answers.
redis:
	@if ! redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1; then \
	  echo "starting redis-server on 127.0.0.1:$(REDIS_PORT)"; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port $(REDIS_PORT) --save "" --appendonly no; \
	  for i in $$(seq 50); do redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 && break; sleep 0.1; done; \
	fi

# ruff (lint, and the format every file is kept in) and mypy, configured in pyproject.toml;
# `make format` rewrites the files into that format.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .

test: venv system-deps redis lint
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: venv redis
	$(PY) -m pytest -q -x -m "not slow" -p no:cacheprovider

demo: venv
	$(PY) -m sd3serve.demo

# Refresh docs/playground.png from a real run of the playground against the reference model.
screenshot: venv system-deps redis
	SD3SERVE_UPDATE_SCREENSHOT=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_playground.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
