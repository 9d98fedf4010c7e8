# clipdistill — `make demo` runs the main job, `make test` lint and the fast tests; both install first.
# `make test-e2e` and `make test-crash-resume` run the end-to-end tests; .ci/run runs all three.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := fonts-noto-color-emoji unicode-cldr-core libfribidi0 chromium
# torch/torchvision: the pinned pair, installed first and exactly, so the package's version
# ranges never pull another (multi-GB) build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install system-deps test test-e2e test-crash-resume test-slow lint demo clean

install: system-deps $(STAMP)

# Debian packages the emoji dataset needs; installed only when missing and only as root.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null || { echo "apt-get install$$missing failed"; exit 1; }; \
	  else \
	    echo "missing Debian packages:$$missing — run: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

# uv installs the same pins as pip in a fifth of the time (fresh venv on the 2-vCPU VM,
# 2026-12-02: 34 s against pip's 163 s; it unpacks torch's CUDA wheels in parallel), which is
# what keeps `make demo` inside its 20 minutes from a fresh clone. uv itself comes from the
# package registry through pip.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q 'uv>=0.5,<1'
	@$(BIN)/uv pip install -q --python $(BIN)/python $(TORCH_PINS)
	@$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]' $(TORCH_PINS)
	@touch $(STAMP)
	@echo "installed clipdistill into $(VENV)"

lint: install
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)

# Every stage prints its 25 slowest tests, so a test that grows is seen where it runs.
PYTEST := $(BIN)/pytest -q --durations=25

# The fast suite: every test not marked e2e or slow (pyproject.toml's addopts).
test: install lint
	$(PYTEST)

# End to end: the tiny demo trained, training through the CLI and torchrun, the browser, and fresh
# interpreters importing torch (hub specs offline, plain open_clip loading a student).
test-e2e: install
	$(PYTEST) -m e2e --ignore=tests/test_crash_resume.py

# Kill-and-resume: SIGKILLs real training processes at several points and compares the resumed
# weights bitwise with an uninterrupted run.
test-crash-resume: install
	$(PYTEST) -m e2e tests/test_crash_resume.py

# Long runs that CI leaves out (fuzz volumes, the full emoji build, every demo method, ...).
test-slow: install
	$(PYTEST) -m slow

demo: install
	$(BIN)/clipdistill demo --preset quick --out runs/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
