# Every target does its own set-up on a fresh Debian machine: a virtualenv with
# the package and its dev extras, and etcd from Debian when none is on PATH.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit integration bench faults setup etcd clean

demo: setup
	$(BIN)/vmbox demo

test: setup lint
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# `make bench BENCH_ARGS="--csv bench.csv"` also writes the figures as CSV.
bench: setup
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# Every fault at full scale (about 90 s); `make test` runs them at small scale.
faults: setup
	$(BIN)/python -m vmbox.faults

setup: $(STAMP) etcd

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV) || { \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

etcd:
	@command -v etcd >/dev/null 2>&1 || { \
		echo "etcd not found: installing Debian's etcd-server and etcd-client"; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q etcd-server etcd-client; \
		$(SUDO) systemctl stop etcd >/dev/null 2>&1 || true; }

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
