"""Demand reports: their encoding, the index a replica keeps, and on the memory store the
reporter, the watch of the group's reports and two replicas sharing theirs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable, Mapping

from tests.conftest import until
from vmbox.functions.demandindex import DemandIndex
from vmbox.state import keys
from vmbox.state.demand import Report, encode_report, parse_report
from vmbox.state.demandsync import DemandReporter, DemandSharing, watch_demand
from vmbox.state.memory import MemoryStore
from vmbox.state.store import KeyValue


def test_a_report_keeps_the_heaviest_sources_sorted_and_compact() -> None:
    offered = {f"10.0.0.{i}": i for i in range(1, 11)}
    raw = encode_report(offered, 3)
    assert raw == b'{"10.0.0.10":10,"10.0.0.8":8,"10.0.0.9":9}'
    assert encode_report({}, 3) == b"{}"
    assert parse_report(raw) == {"10.0.0.10": 10, "10.0.0.8": 8, "10.0.0.9": 9}


def test_reports_that_do_not_parse_are_refused() -> None:
    for raw in (b"abc", b"[1]", b'{"s": -1}', b'{"s": "7"}', b'{"s": true}'):
        assert parse_report(raw) is None


def test_the_index_tells_which_sources_changed() -> None:
    index = DemandIndex()
    a, b = {"s": 3, "t": 1}, {"s": 5}
    assert index.replace({"a": a, "b": b}) == {"s", "t"}
    assert index.by_source == {"s": {"a": 3, "b": 5}, "t": {"a": 1}}
    assert index.replace({"a": a, "b": {"s": 5}}) == set()  # equal reports change nothing
    assert index.replace({"a": {"u": 2}, "b": b}) == {"s", "t", "u"}
    assert index.by_source == {"s": {"b": 5}, "u": {"a": 2}}
    assert index.replace({"a": {"u": 2}}, keep=("b",)) == set()  # b's report outlives b
    assert index.replace({"a": {"u": 2}}) == {"s"}
    assert index.by_source == {"u": {"a": 2}}


def reporter(store: MemoryStore, offered: dict[str, int], lease: list[int]) -> DemandReporter:
    def collect() -> dict[str, int]:
        out = dict(offered)
        offered.clear()
        return out

    return DemandReporter(
        store, "web", "r1", collect, lambda: lease[0], interval=0.1, max_sources=2
    )


KEY = "/vmbox/web/demand/r1"


def test_one_put_per_report_on_the_lease_and_none_when_nothing_changed() -> None:
    store, offered = MemoryStore(), {"a": 5, "b": 1, "c": 9}

    async def main() -> None:
        lease = [await store.grant_lease(10)]
        rep = reporter(store, offered, lease)
        assert await rep.report()
        assert await store.get(KEY) == KeyValue(KEY, b'{"a":5,"c":9}', 2, lease[0])
        assert await rep.report()  # nothing offered: an empty report, once
        assert not await rep.report()
        stored = await store.get(KEY)
        assert stored is not None and stored.value == b"{}" and store.revision == 3
        await store.revoke_lease(lease[0])  # the report goes with the lease
        lease[0] = await store.grant_lease(10)  # registered again
        assert await rep.report() and rep.writes == 3
        stored = await store.get(KEY)
        assert stored is not None and stored.lease == lease[0] and store.revision == 5

    asyncio.run(main())


def test_no_report_without_a_lease_or_a_store() -> None:
    store, lease = MemoryStore(), [0]

    async def main() -> None:
        rep = reporter(store, {"a": 1}, lease)
        assert not await rep.report() and store.revision == 1
        lease[0] = await store.grant_lease(10)
        await store.revoke_lease(lease[0])
        assert not await rep.report()  # LeaseLost: the membership registers again
        assert rep.last_error is None
        lease[0] = await store.grant_lease(10)
        store.available = False
        assert not await rep.report()
        assert rep.last_error is not None and "unavailable" in rep.last_error
        store.available = True
        assert await rep.report() and rep.last_error is None
        assert await store.get(KEY) is not None and rep.writes == 1

    asyncio.run(main())


class Offered:
    """A DemandAware middlebox reduced to its demand: offered counts out, reports in."""

    def __init__(self, offered: dict[str, int]) -> None:
        self.offered = offered
        self.seen: list[dict[str, dict[str, int]]] = []

    def take_demand(self) -> dict[str, int]:
        return dict(self.offered)

    def set_demand(self, reports: Mapping[str, Mapping[str, int]], tick: int | None = None) -> None:
        self.seen.append({replica: dict(report) for replica, report in reports.items()})


def test_watch_demand_follows_reports_and_keeps_unchanged_ones_identical() -> None:
    store = MemoryStore()
    prefix = keys.demand_prefix("web")

    async def main() -> None:
        await store.put(prefix + "r1", b'{"a":1}')
        snapshots: list[dict[str, Report]] = []

        async def follow() -> None:
            async for reports in watch_demand(store, "web", retry=0.01):
                snapshots.append(reports)

        task = asyncio.create_task(follow())
        await until(lambda: len(snapshots) == 1, 1)
        lease = await store.grant_lease(10)
        await store.put(prefix + "r2", b'{"b":2}', lease=lease)
        await store.put(prefix + "r2", b"[not a report]", lease=lease)
        await until(lambda: len(snapshots) == 3, 1)
        store.available = False  # an outage: the watch goes on where it was
        await asyncio.sleep(0.02)
        store.available = True
        await store.revoke_lease(lease)  # r2 leaves: its report goes with its lease
        await until(lambda: len(snapshots) == 4, 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        r1 = {"a": 1}
        assert snapshots == [
            {"r1": r1},
            {"r1": r1, "r2": {"b": 2}},
            {"r1": r1, "r2": {}},
            {"r1": r1},
        ]
        assert all(s["r1"] is snapshots[0]["r1"] for s in snapshots)

    asyncio.run(main())


def test_replicas_see_each_others_reports_through_the_store() -> None:
    store = MemoryStore()

    async def main() -> None:
        boxes = {"r1": Offered({"10.0.0.1": 4}), "r2": Offered({"10.0.0.1": 1, "10.0.0.2": 9})}
        leases = {r: await store.grant_lease(10) for r in boxes}

        def lease_of(replica: str) -> Callable[[], int]:
            return lambda: leases[replica]

        sharings = [
            DemandSharing(store, "web", r, box, lease_of(r), interval=0.01, max_sources=8)
            for r, box in boxes.items()
        ]
        tasks = [asyncio.create_task(sharing.run()) for sharing in sharings]
        both = {"r1": {"10.0.0.1": 4}, "r2": {"10.0.0.1": 1, "10.0.0.2": 9}}
        await until(lambda: all(box.seen and box.seen[-1] == both for box in boxes.values()), 1)
        writes = [sharing.gauges()["demand_report_writes"] for sharing in sharings]
        await asyncio.sleep(0.05)  # the same demand: nothing more is written
        assert (
            [sharing.gauges()["demand_report_writes"] for sharing in sharings] == writes == [1, 1]
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def test_a_timer_that_fires_early_does_not_make_a_second_report() -> None:
    """asyncio may fire a timer up to its clock's resolution early; a report loop
    that then reported again at once wrote a near-empty report between two full
    ones, and a window that divided by it gave its source the even share."""
    store = MemoryStore()

    async def main() -> int:
        lease = await store.grant_lease(10)
        collected: list[float] = []

        def collect() -> dict[str, int]:
            collected.append(time.time())
            return {"10.0.0.1": len(collected)}  # always changed: every report is written

        # Half the readings, at random, 2 ms behind: a wake-up that looks early (float
        # rounding at today's epoch, about 2e-7 s, does the same to a loop that trusts
        # it). At random, not every other one: a loop that reads the clock twice per
        # pass would otherwise never see an early wake-up.
        behind = random.Random(7)

        def clock() -> float:
            return time.time() - (0.002 if behind.random() < 0.5 else 0.0)

        reporter = DemandReporter(
            store,
            "web",
            "r1",
            collect,
            lambda: lease,
            interval=0.05,
            max_sources=2,
            clock=clock,
        )
        task = asyncio.create_task(reporter.run())
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gaps = [b - a for a, b in itertools.pairwise(collected)]
        assert all(gap > 0.03 for gap in gaps), gaps
        return len(collected)

    assert 8 <= asyncio.run(main()) <= 11
