"""Demand reports: their encoding, the index a replica keeps, the reporter on the memory store."""

from __future__ import annotations

import asyncio

from vmbox.functions.demandindex import DemandIndex
from vmbox.state.demand import DemandReporter, encode_report, parse_report
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
