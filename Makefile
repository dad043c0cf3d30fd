# Every target does its own set-up on a fresh Debian machine: a virtualenv with
# the package and its dev extras, and etcd from Debian when none is on PATH.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit integration bench faults setup etcd tools clean image

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

setup: $(STAMP) etcd tools

$(STAMP): pyproject.toml | tools
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

# The lab's and the in-path data plane's tools (`command:package`), and what building
# netfilterqueue (pinned in pyproject.toml, no wheel) needs; one apt-get for all missing.
# Root's tools live in /usr/sbin, which a user's PATH may lack: look there too.
TOOLS := ip:iproute2 sysctl:procps iptables:iptables nft:nftables iperf3:iperf3 \
	hping3:hping3 curl:curl tcpdump:tcpdump ping:iputils-ping gcc:gcc kubectl:kubernetes-client
NFQ_HEADER := /usr/include/libnetfilter_queue/libnetfilter_queue.h

tools:
	@export PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for pair in $(TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	ldconfig -p 2>/dev/null | grep -q 'libnetfilter_queue\.so\.1 ' || \
		missing="$$missing libnetfilter-queue1"; \
	[ -e $(NFQ_HEADER) ] || missing="$$missing libnetfilter-queue-dev"; \
	$(PYTHON) -c 'import sysconfig, os, sys; \
		sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
		2>/dev/null || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing from Debian:$$missing"; \
		echo 'iperf3 iperf3/start_daemon boolean false' | $(SUDO) debconf-set-selections || true; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# The replica and operator image (Containerfile), tagged as deploy/ and
# `vmbox k8s render` name it; for kind: podman save IMAGE | kind load image-archive /dev/stdin
IMAGE ?= localhost/vmbox:0.1.0
image:
	@command -v podman >/dev/null 2>&1 || { echo "podman not found: not building $(IMAGE)"; exit 0; }; \
	podman build $(if $(BASE),--build-arg BASE=$(BASE)) $(IMAGE_ARGS) -f Containerfile -t $(IMAGE) . && \
	podman run --rm --read-only --network none $(IMAGE) --help

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
