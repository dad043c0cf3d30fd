"""Tests that need a lab of network namespaces (vmbox.lab): build one, run inside, remove it.

`lab_running()` builds a lab with a name of its own (`vt<pid>x<n>`, so tests
in parallel processes never share one) and always removes it, its processes
included, even when the test fails; the `lab` fixture is one with a single
client. `require_lab()` skips without root or `ip`, but fails under CI (CI
set), where the lab tests must run (as tests/integration/cgroup.py does for
memory cgroups). `host_network_state()` is what a lab must leave untouched.
Used by test_lab.py and the in-path tests.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.cgroup import in_ci
from vmbox.lab import LabPlan, down, exec_argv, up

_serial = itertools.count()
HOST_COMMANDS = (
    ("ip", "link"),
    ("ip", "route"),
    ("ip", "-6", "route"),
    ("ip", "rule"),
    ("ip", "-6", "rule"),
    ("nft", "list", "ruleset"),
    ("iptables-save",),
    ("ip6tables-save",),
)
HOST_SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/all/accept_dad",
    "net/ipv6/conf/default/accept_dad",
)


def no_lab() -> str | None:
    """Why this process cannot build labs, or None when it can."""
    if os.geteuid() != 0:
        return "a lab of network namespaces needs root"
    for tool in ("ip", "sysctl"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (make setup installs it)"
    return None


def require_lab() -> None:
    """Return if labs can be built here; skip (fail under CI) if not."""
    if reason := no_lab():
        if in_ci():
            pytest.fail(f"CI must run the lab tests, but: {reason}")
        pytest.skip(reason)


def unique_prefix() -> str:
    return f"vt{os.getpid()}x{next(_serial)}"


@contextmanager
def lab_running(clients: int = 1, nodes: int = 0) -> Iterator[LabPlan]:
    """A fresh lab (a fleet of `nodes` when given) for the block; removed afterwards
    whatever happened."""
    require_lab()
    plan = LabPlan(unique_prefix(), clients, nodes)
    try:
        up(plan, replace=True)
        yield plan
    finally:
        down(plan.prefix)


@pytest.fixture
def lab() -> Iterator[LabPlan]:
    with lab_running() as plan:
        yield plan


def in_lab(
    plan: LabPlan, role: str, argv: Sequence[str], timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion inside the lab's `role` namespace."""
    return subprocess.run(
        exec_argv(role, argv, plan.prefix), capture_output=True, text=True, timeout=timeout
    )


def _canonical(argv: Sequence[str], out: str) -> str:
    if argv[0].endswith("tables-save"):  # a timestamp comment, and counters that traffic moves
        out = "".join(line for line in out.splitlines(True) if not line.startswith("#"))
        out = re.sub(r"\[\d+:\d+\]", "[counters]", out)
    return out


def host_network_state() -> dict[str, str]:
    """The host namespace's links, routes, rules, rulesets and forwarding sysctls, as text."""
    state = {}
    for argv in HOST_COMMANDS:
        if shutil.which(argv[0]) is None:
            continue
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        state[" ".join(argv)] = f"{done.returncode}\n{_canonical(argv, done.stdout)}{done.stderr}"
    for name in HOST_SYSCTLS:
        state[name] = Path("/proc/sys", name).read_text()
    return state
