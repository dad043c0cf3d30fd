"""Demand reports: their encoding, the index a replica keeps, the reporter against a fake store."""

from __future__ import annotations

import asyncio
import json

from vmbox.functions.demandindex import DemandIndex
from vmbox.state.demand import DemandReporter, encode_report, parse_report
from vmbox.state.store import LeaseLost, StoreError, StoreUnavailable


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


class FakeStore:
    def __init__(self) -> None:
        self.puts: list[tuple[str, bytes, int]] = []
        self.fail: StoreError | None = None

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        if self.fail is not None:
            raise self.fail
        self.puts.append((key, value, lease))
        return len(self.puts)


def reporter(store: FakeStore, offered: dict[str, int], lease: list[int]) -> DemandReporter:
    def collect() -> dict[str, int]:
        out = dict(offered)
        offered.clear()
        return out

    return DemandReporter(
        store,  # type: ignore[arg-type]
        "web",
        "r1",
        collect,
        lambda: lease[0],
        interval=0.1,
        max_sources=2,
    )


def test_one_put_per_report_on_the_lease_and_none_when_nothing_changed() -> None:
    store, offered, lease = FakeStore(), {"a": 5, "b": 1, "c": 9}, [7]
    rep = reporter(store, offered, lease)
    assert asyncio.run(rep.report())
    assert store.puts == [("/vmbox/web/demand/r1", b'{"a":5,"c":9}', 7)]
    assert asyncio.run(rep.report())  # nothing offered: an empty report, once
    assert not asyncio.run(rep.report())
    assert [json.loads(v) for _, v, _ in store.puts] == [{"a": 5, "c": 9}, {}]
    lease[0] = 8  # registered again: the report went with the old lease
    assert asyncio.run(rep.report()) and store.puts[-1][2] == 8 and rep.writes == 3


def test_no_report_without_a_lease_or_a_store() -> None:
    store, lease = FakeStore(), [0]
    rep = reporter(store, {"a": 1}, lease)
    assert not asyncio.run(rep.report()) and store.puts == []
    lease[0] = 3
    for error in (LeaseLost("gone"), StoreUnavailable("etcd away")):
        store.fail = error
        assert not asyncio.run(rep.report())
    assert rep.last_error == "etcd away"
    store.fail = None
    assert asyncio.run(rep.report()) and rep.last_error is None
