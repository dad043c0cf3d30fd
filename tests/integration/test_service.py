"""The foundation, end to end: the limit holds across 1, 2, 4 replicas and through a kill -9.

Real etcd (the session fixture), real replica processes, real UDP on loopback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path

import pytest

from tests.integration.harness import make_spec, running_service
from vmbox.control import events
from vmbox.tools.load import LoadPlan, run_load

LIMIT = 100


def window_rate(history: list[tuple[int, int]], start: float, seconds: int) -> list[int]:
    """Per-second counts of the echo server for whole seconds from `start` on."""
    counts = dict(history)
    first = int(start) + 1
    return [counts.get(s, 0) for s in range(first, first + seconds)]


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_limit_holds_with_n_replicas(etcd, tmp_path: Path, replicas: int) -> None:
    """300 packets/s from one source over 64 flows: the server sees 100 ± 5 per second."""

    async def scenario() -> tuple[list[int], list[float]]:
        spec = make_spec(f"hold{replicas}", replicas)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await asyncio.sleep(0.5)  # every replica has seen the others
            plan = LoadPlan(
                target=spec.listen, rate=300, ramp=None, sources=1, flows=64, duration=8.0
            )
            started = time.time()
            load = asyncio.create_task(run_load(plan))
            await asyncio.sleep(4.0)
            shares = [g.get("vmbox_share", 0.0) for g in (await svc.gauges()).values()]
            await load
            await asyncio.sleep(1.2)
            return window_rate(svc.echo.history, started + 2, 5), shares

    per_second, shares = asyncio.run(scenario())
    print(f"{replicas} replicas: shares {sorted(shares)}, server received/s {per_second}")
    assert sum(shares) == LIMIT and len(shares) == replicas
    mean = statistics.fmean(per_second)
    assert abs(mean - LIMIT) <= 5, per_second
    assert all(abs(c - LIMIT) <= 15 for c in per_second), per_second


def test_kill_9_replica_is_restarted_and_limit_holds(etcd, tmp_path: Path) -> None:
    async def scenario() -> dict[str, object]:
        spec = make_spec("kill", 3)
        async with running_service(etcd.endpoints, spec, tmp_path) as svc:
            await asyncio.sleep(0.5)
            plan = LoadPlan(
                target=spec.listen, rate=300, ramp=None, sources=1, flows=64, duration=14.0
            )
            load = asyncio.create_task(run_load(plan))
            await asyncio.sleep(3.0)
            victim = (await svc.members())["kill-2"]
            old_pid = int(victim.info["pid"])
            os.kill(old_pid, signal.SIGKILL)
            killed_at = time.time()
            members = await svc.wait_ready(3, timeout=10, exclude_pids={old_pid})
            rejoined_at = time.time()
            # The new replica takes its share at the first window boundary after
            # every member acknowledged it (the resize guard): within ~1 s.
            deadline = time.monotonic() + 2.5
            while True:
                shares = sorted(g["vmbox_share"] for g in (await svc.gauges()).values())
                if shares == [33, 33, 34] or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            await load
            await asyncio.sleep(1.2)
            after = window_rate(svc.echo.history, rejoined_at + 0.5, 4)
            kinds = [e.kind for e in await events.recent(svc.store, spec.service, 20)]
            return {
                "new_pid": members["kill-2"].info["pid"],
                "old_pid": old_pid,
                "shares": shares,
                "after": after,
                "events": kinds,
                "rejoin_s": rejoined_at - killed_at,
            }

    result = asyncio.run(scenario())
    print(
        f"kill -9: rejoined after {result['rejoin_s']:.2f}s, shares {result['shares']}, "
        f"server received/s after {result['after']}"
    )
    assert result["new_pid"] != result["old_pid"]
    assert result["shares"] == [33, 33, 34]
    after = result["after"]
    assert isinstance(after, list)
    assert abs(statistics.fmean(after) - LIMIT) <= 0.10 * LIMIT, after
    assert "crash" in result["events"]  # type: ignore[operator]
