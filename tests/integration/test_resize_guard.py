"""The resize guard end to end: 1 -> 4 and 4 -> 1 under load, with and without it.

Over-admission is what the echo server (the protected upstream) received
above the limit, summed over the 5 whole seconds from the one before the
first membership change: sum of max(0, received - limit). The issue asks it
under 5% of what those seconds may admit, i.e. under 0.05 * limit * 5 s = 25
packets at limit 100. The figure without the guard is printed beside it (the
window-freeze rule already hides most disagreement, so it is usually small
too; bench/resize.py aims changes at window boundaries and repeats them).
The guard must also come down within about a second of the last change.

Over-admission alone cannot tell the guard from its absence (both are
usually under the bound), so each survivor must also show that its guard
went up for this resize and came down after it (`vmbox_resize_guard_lifts`
grew, `vmbox_resize_guard_lifted_at` is after the first change), and the run
without it must show no guard at all: the same assertions fail with the guard
switched off.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import make_spec, running_service
from vmbox.etcdserver import EtcdServer
from vmbox.state.membership import watch_members
from vmbox.testbed import Service
from vmbox.tools.load import LoadPlan, run_load

LIMIT, SECONDS = 100, 5
ALLOWED = 0.05 * LIMIT * SECONDS  # 25 packets over the 5 s
# The test's own watch reports a membership change a few ms after the replicas see
# it. A drained replica leaves just before a window boundary (vmbox.dataplane.drain),
# so the survivors' guard can come down at that boundary before the test hears of
# the change: a lift this much before the reported change still follows it.
WATCH_LAG = 0.1


@dataclass
class Outcome:
    over: int
    per_second: list[int]
    changes: list[float]  # wall times the membership changed (as the test's watch saw it)
    scaled_at: float  # wall time just before the scale command: every change is after it
    before: dict[str, dict[str, float]]  # each replica's gauges just before the resize
    gauges: dict[str, dict[str, float]]  # the survivors', after the window

    def engaged(self) -> dict[str, bool]:
        """Survivor -> whether its guard went up for this resize and came down after it."""
        return {
            rid: g["vmbox_resize_guard_lifts"]
            > self.before.get(rid, {}).get("vmbox_resize_guard_lifts", 0.0)
            and g["vmbox_resize_guard_lifted_at"] > max(self.scaled_at, self.changes[0] - WATCH_LAG)
            for rid, g in self.gauges.items()
        }


async def resize(svc: Service, target: int) -> Outcome:
    changes: list[float] = []

    async def follow() -> None:
        members: set[str] | None = None
        async for snapshot in watch_members(svc.store, svc.spec.service):
            if set(snapshot) != members:  # not a replica updating its info (drain does)
                members = set(snapshot)
                changes.append(time.time())

    # At most 10 s; stopped once the window has been counted (nothing reads it after).
    plan = LoadPlan(svc.spec.relay.listen, rate=300, sources=1, flows=64, duration=10.0)
    load = asyncio.create_task(run_load(plan))
    watcher = asyncio.create_task(follow())
    try:
        await asyncio.sleep(2.0)
        # Just before a whole second, as a boundary is where replicas disagree.
        await asyncio.sleep(math.floor(time.time()) + 1.95 - time.time())
        before = await svc.gauges()
        mark = len(changes)
        scaled_at = time.time()
        await svc.scale(target)
        await svc.wait_ready(target)
        window = math.floor(changes[mark]) - 1
        await asyncio.sleep(window + SECONDS + 0.3 - time.time())
        gauges = await svc.gauges()
    finally:
        for task in (load, watcher):
            task.cancel()
        await asyncio.gather(load, watcher, return_exceptions=True)
    counts = dict(svc.echo.history)
    per_second = [counts.get(s, 0) for s in range(window, window + SECONDS)]
    over = sum(max(0, c - LIMIT) for c in per_second)
    return Outcome(over, per_second, changes[mark:], scaled_at, before, gauges)


def run_case(
    etcd_endpoints: list[str], tmp_path: Path, case: tuple[int, int], guard: bool
) -> Outcome:
    async def scenario() -> Outcome:
        name = f"guard{case[0]}{case[1]}{'on' if guard else 'off'}"
        spec = make_spec(name, case[0], resize_guard=guard)
        async with running_service(etcd_endpoints, spec, tmp_path) as svc:
            await asyncio.sleep(1.2)  # past every replica's first window; guard down
            return await resize(svc, case[1])

    return asyncio.run(scenario())


@pytest.mark.parametrize("case", [(1, 4), (4, 1)], ids=["1to4", "4to1"])
def test_over_admission_around_a_resize_stays_under_5_percent(
    etcd: EtcdServer, tmp_path: Path, case: tuple[int, int]
) -> None:
    on = run_case(etcd.endpoints, tmp_path, case, guard=True)
    off = run_case(etcd.endpoints, tmp_path, case, guard=False)
    survivors = list(on.gauges.values())
    up = max(g["vmbox_resize_guard_last_seconds"] for g in survivors)
    settle = max(g["vmbox_resize_guard_lifted_at"] for g in survivors) - on.changes[-1]
    print(
        f"{case[0]} -> {case[1]}: over-admission with the guard {on.over} packets "
        f"({100 * on.over / (LIMIT * SECONDS):.1f}% of {LIMIT}/s * {SECONDS} s) {on.per_second}; "
        f"without it {off.over} ({100 * off.over / (LIMIT * SECONDS):.1f}%) {off.per_second}; "
        f"guard up {up:.2f} s, down {settle:.2f} s after the last change"
    )
    assert on.over < ALLOWED, on.per_second
    assert len(on.gauges) == len(off.gauges) == case[1]
    # The guard went up at this resize on every survivor (joiners included: they
    # start guarded) and came down after it; without it, it never did.
    assert all(on.engaged().values()), (on.before, on.gauges)
    assert all(g["vmbox_resize_guard_lifts"] == 0 for g in off.gauges.values()), off.gauges
    assert all(g["vmbox_resize_guarded"] == 0 for g in survivors), on.gauges
    # Down at the first window boundary after every member acknowledged; settle is
    # measured from a lift that followed the changes (engaged above), so it cannot
    # pass by a lift that never happened.
    assert -WATCH_LAG < settle <= 1.5 and 0 < up <= 1.5 + on.changes[-1] - on.changes[0]
