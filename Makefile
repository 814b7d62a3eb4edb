# Developer entry points. Every target creates the virtual environment and installs the project
# (from PyPI only, via `pip install -e '.[dev]'`) when needed, so a fresh clone needs just
# `make demo` or `make test`.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra arguments: `make test PYTEST_ARGS='-m "not slow"'`, `make demo DEMO_ARGS='--decode 8'`.
PYTEST_ARGS ?=
DEMO_ARGS ?=
RUNS ?= runs

.DEFAULT_GOAL := help
.PHONY: help venv install sglang-wheel test test-fast lint demo soak bench-proxy bench-gateway \
	bench-decision bench-zones bench-emulator bench-compare bench-all readme clean

help:
	@echo "make demo    emulated PD cluster + fitted zone table + gateway (prints where to send requests)"
	@echo "make test    create .venv, install, run the whole test suite"
	@echo "make lint    ruff + mypy"
	@echo "make soak    bounded loopback soak run (SOAK_ARGS='--minutes 10')"
	@echo "make readme  regenerate README's configuration and metrics reference"
	@echo "make bench-proxy|bench-gateway|bench-decision|bench-zones|bench-emulator|bench-compare"

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)

# The stamp is rebuilt whenever pyproject.toml changes, so dependency edits reach existing venvs.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	$(MAKE) sglang-wheel
	touch $@

# The sglang wheel is the source of truth for the wire contract: contract tests read its sources
# (tests/emulator/sglang_source.py). Downloaded, never installed (it pulls in torch).
SGLANG_VERSION ?= 0.5.23
sglang-wheel:
	@ls $(VENV)/sglang-wheel/sglang-$(SGLANG_VERSION)-*.whl >/dev/null 2>&1 || \
		$(PY) -m pip download --no-deps --only-binary=:all: --dest $(VENV)/sglang-wheel \
			sglang==$(SGLANG_VERSION)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The quick inner loop: skips end-to-end tests that start subprocesses (CI runs them).
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy scripts/soak.py

demo: install
	$(PY) -m loadtest demo $(DEMO_ARGS)

SOAK_ARGS ?=
soak: install
	$(PY) scripts/soak.py $(SOAK_ARGS)

bench-proxy: install
	$(PY) benchmarks/proxy_stack.py

bench-gateway: install
	$(PY) benchmarks/gateway_vs_rust.py

bench-decision: install
	$(PY) benchmarks/eldr_decision.py

bench-zones: install
	$(PY) benchmarks/zones_fit.py

bench-emulator: install
	$(PY) benchmarks/emulator_locality.py

bench-compare: install
	$(PY) -m loadtest compare --quick --out $(RUNS)/compare-quick

bench-all: bench-proxy bench-gateway bench-decision bench-zones bench-emulator bench-compare

# Regenerates README.md's configuration and metrics tables from gateway/config.py and the
# metric modules (tests/deploy/test_readme_reference.py fails when they are stale).
readme: install
	$(PY) -m tests.deploy.readme_reference

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
