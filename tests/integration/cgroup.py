"""Tests that need a writable memory cgroup: skipped without one, except under CI.

A developer's machine may lack one (not root, a read-only cgroupfs, cgroup v2
whose memory controller is not delegated to us); the test then skips with the
reason. CI (.ci/run sets CI=true) runs as root on a machine with a writable
memory cgroup (v1), so there a missing one is a broken set-up, and a skip
would hide that the cgroup tests never ran: `without_cgroups` fails instead.
Used by test_cgroups.py, test_monitor.py, test_flood.py and
test_experiment_scaling.py.
"""

from __future__ import annotations

import os
import time
from typing import NoReturn

import pytest

from vmbox.runtime.local import open_cgroups

MIB = 1024 * 1024


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def without_cgroups(reason: str) -> NoReturn:
    """Skip for want of a memory cgroup (`reason` says why); fail under CI."""
    if in_ci():
        pytest.fail(f"CI must run the memory cgroup tests, but: {reason}")
    pytest.skip(reason)


def no_cgroups(limit: int = 70 * MIB) -> str | None:
    """Why replicas cannot get memory cgroups here, or None when they can."""
    cgroups, note = open_cgroups(f"probe{time.monotonic_ns()}", limit)
    if cgroups is not None:
        cgroups.sweep()
        return None
    return note


def require_cgroups() -> None:
    """Return if replicas can get memory cgroups here; skip (fail under CI) if not."""
    if reason := no_cgroups():
        without_cgroups(reason)
