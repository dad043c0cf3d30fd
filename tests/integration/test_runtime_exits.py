"""The local runtime wakes its controller the moment a replica exits (a pidfd per replica).

Real processes stand in for replicas (their command line names `replica` and
the id, which is what adoption checks); no etcd is needed. A SIGKILL must
wake the watcher within WAKE_BOUND, whether the replica was taken on from the
loop's thread or from another one, and `reap` then reports it; watching
stops (every pidfd closed) when asked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbox.runtime.base import ExitWatch
from vmbox.runtime.local import LocalRuntime

WAKE_BOUND = 0.5  # s from SIGKILL to the wake; measured a few ms


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Stand-in replicas web-1 and web-2, killed and reaped afterwards."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", "replica", f"web-{n}"]
        )
        for n in (1, 2)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_killed_replica_wakes_the_watcher_at_once(
    sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    runtime = LocalRuntime("web", [], tmp_path)
    assert isinstance(runtime, ExitWatch)
    one, two = sleepers

    async def scenario() -> tuple[list[float], list[str], int]:
        woken = asyncio.Event()
        before = open_fds()
        runtime.watch_exits(woken.set)
        assert runtime.adopt("web-1", one.pid)
        # Taken on from another thread (stop() and drains run in threads): still watched.
        assert await asyncio.to_thread(runtime.adopt, "web-2", two.pid)
        await asyncio.sleep(0.05)
        waits, reaped = [], []
        for proc in (one, two):
            woken.clear()
            killed = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            async with asyncio.timeout(WAKE_BOUND):
                await woken.wait()
            waits.append(time.monotonic() - killed)
            await asyncio.to_thread(proc.wait)  # our child: a zombie until then
            reaped += [e.replica_id for e in runtime.reap()]
        runtime.watch_exits(None)
        return waits, reaped, open_fds() - before

    waits, reaped, leaked = asyncio.run(scenario())
    print(f"SIGKILL -> wake: {[f'{w * 1000:.1f} ms' for w in waits]}")
    assert reaped == ["web-1", "web-2"]
    assert all(w < WAKE_BOUND for w in waits)
    assert leaked == 0  # every pidfd closed


def test_watching_stops_when_asked(sleepers: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    runtime = LocalRuntime("web", [], tmp_path)
    one, _ = sleepers

    async def scenario() -> tuple[bool, int]:
        woken = asyncio.Event()
        before = open_fds()
        runtime.watch_exits(woken.set)
        assert runtime.adopt("web-1", one.pid)
        opened = open_fds() - before
        runtime.watch_exits(None)
        os.kill(one.pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        return woken.is_set(), opened - (open_fds() - before)

    woke, closed = asyncio.run(scenario())
    assert not woke and closed == 1
