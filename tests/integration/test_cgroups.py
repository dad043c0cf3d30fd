"""vmbox.runtime.cgroups against the machine's real cgroupfs.

Skipped, with the reason, when not root or when no writable memory cgroup
exists here (a container with a read-only cgroupfs, cgroup v2 whose memory
controller cannot be delegated below our own cgroup), except under CI, where
that fails (tests/integration/cgroup.py). The parsing is covered without root
by tests/unit/test_cgroups.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration.cgroup import without_cgroups
from vmbox.runtime.cgroups import CgroupUnavailable, ReplicaCgroups, join_command

MIB = 1024 * 1024


@pytest.fixture
def cgroups() -> Iterator[ReplicaCgroups]:
    if os.geteuid() != 0:
        without_cgroups("memory cgroups need root")
    try:
        made = ReplicaCgroups(f"test{os.getpid()}", 70 * MIB)
        made.probe()
    except CgroupUnavailable as exc:
        without_cgroups(f"no usable memory cgroup: {exc}")
    yield made
    made.sweep()
    assert not made.base.exists(), f"{made.base} left behind"


def test_a_process_runs_inside_its_cgroup_from_the_start(cgroups: ReplicaCgroups) -> None:
    cgroup = cgroups.create("r1")
    assert cgroup.limit() == 70 * MIB
    argv = join_command(cgroup.path, [sys.executable, "-c", "import sys; sys.stdin.read()"])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while proc.pid not in cgroup.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.pid in cgroup.pids()  # the shell exec'd python: the same pid
        found = cgroups.of_pid("r1", proc.pid)
        assert found is not None and found.path == cgroup.path
        assert 0 < cgroup.working_set() < 70 * MIB
    finally:
        proc.communicate(b"")
    assert cgroup.remove(), "an empty cgroup must be removable once its process is reaped"


def test_the_oom_killer_is_counted(cgroups: ReplicaCgroups) -> None:
    cgroups.limit = 32 * MIB
    cgroup = cgroups.create("hog")
    hog = [sys.executable, "-c", "x = b'x' * (200 * 1024 * 1024)"]
    done = subprocess.run(join_command(cgroup.path, hog), capture_output=True)
    assert done.returncode == -9
    assert cgroup.oom_kills() == 1
    assert cgroup.remove()
