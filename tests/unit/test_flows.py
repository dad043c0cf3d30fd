"""The UDP relay's flow table without sockets: expiry, recency, the bound, removal."""

from __future__ import annotations

import random

import pytest

from vmbox.dataplane.flows import Flow, FlowTable, Peer


def peer(n: int) -> Peer:
    return ("127.0.0.1", 40000 + n)


def table_with(times: list[float], idle: float = 30.0, most: int = 100) -> FlowTable[Flow]:
    table: FlowTable[Flow] = FlowTable(idle, most)
    for n, when in enumerate(times):
        assert table.add(Flow(peer(n), when)) == []
    return table


def ports(flows: list[Flow]) -> list[int]:
    return [int(f.addr[1]) - 40000 for f in flows]


def test_a_flow_expires_at_exactly_idle_timeout_and_not_before() -> None:
    table = table_with([10.0, 12.0], idle=5.0)
    assert table.expire(14.999) == []
    assert ports(table.expire(15.0)) == [0]  # idle for 5.0 s exactly
    assert len(table) == 1 and table.get(peer(0)) is None
    assert table.expire(16.9) == []
    assert ports(table.expire(17.0)) == [1]
    assert len(table) == 0 and table.expire(100.0) == []


def test_activity_postpones_expiry() -> None:
    table = table_with([10.0, 11.0], idle=5.0)
    first = table.get(peer(0))
    assert first is not None
    table.touch(first, 14.0)
    assert ports(table.expire(16.0)) == [1]  # the untouched one, though it came later
    assert ports(table.flows()) == [0]
    assert ports(table.expire(19.0)) == [0]


def test_recent_clients_newest_first_with_when() -> None:
    table = table_with([1.0, 2.0, 3.0, 4.0])
    flow = table.get(peer(1))
    assert flow is not None
    table.touch(flow, 5.0)
    assert table.recent(now=5.0, within=2.0) == [(peer(1), 5.0), (peer(3), 4.0), (peer(2), 3.0)]
    assert table.recent(now=5.0, within=0.0) == [(peer(1), 5.0)]
    assert table.recent(now=10.0, within=1.0) == []
    assert [addr for addr, _ in table.recent(now=5.0, within=10.0)] == [
        peer(1),
        peer(3),
        peer(2),
        peer(0),
    ]


def test_a_full_table_evicts_the_least_recently_active() -> None:
    table = table_with([1.0, 2.0, 3.0], most=3)
    oldest = table.get(peer(0))
    assert oldest is not None
    table.touch(oldest, 4.0)  # now peer 1 is the least recently active
    evicted = table.add(Flow(peer(3), 5.0))
    assert ports(evicted) == [1]
    assert len(table) == 3 and table.get(peer(1)) is None
    assert ports(table.flows()) == [2, 0, 3]


def test_the_bound_holds_whatever_arrives() -> None:
    rng = random.Random(3)
    table: FlowTable[Flow] = FlowTable(idle_timeout=2.0, max_flows=8)
    live: dict[Peer, Flow] = {}
    now = 0.0
    for _ in range(5000):
        now += rng.uniform(0.0, 0.3)
        addr = peer(rng.randrange(30))
        flow = table.get(addr)
        if flow is None:
            flow = Flow(addr, now)
            gone = table.add(flow)
            live[addr] = flow
        else:
            assert live[addr] is flow
            table.touch(flow, now)
            gone = []
        if rng.random() < 0.1:
            expired = table.expire(now)
            assert all(f.last_seen <= now - 2.0 for f in expired)
            assert all(f.last_seen > now - 2.0 for f in table.flows())
            gone += expired
        for old in gone:  # each flow leaves once, and what left is no longer held
            assert live.pop(old.addr) is old and not table.holds(old)
        assert len(table) == len(live) <= 8
        held = table.flows()
        assert [f.last_seen for f in held] == sorted(f.last_seen for f in held)


def test_remove_takes_only_the_flow_itself() -> None:
    table = table_with([1.0, 2.0])
    first = table.get(peer(0))
    assert first is not None
    assert table.remove(first) and not table.holds(first)
    assert not table.remove(first)  # already gone
    newer = Flow(peer(0), 3.0)
    table.add(newer)
    assert not table.remove(first)  # a later flow of the same client stays
    assert table.holds(newer) and len(table) == 2


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        FlowTable(0.0, 10)
    with pytest.raises(ValueError, match="max_flows"):
        FlowTable(1.0, 0)


def test_a_table_emptied_by_expiry_is_rebuilt_at_its_size_with_order_kept() -> None:
    table = table_with([float(n) for n in range(2000)], idle=10.0, most=5000)
    big = table._flows
    # Expire all but the 300 newest: 300 <= 2000 / 4, so the dict is rebuilt.
    assert len(table.expire(1709.0)) == 1700
    assert table._flows is not big
    assert ports(table.flows()) == list(range(1700, 2000))
    assert table.get(peer(1800)) is not None and table.get(peer(5)) is None
    # A table that shrinks by less than that keeps its dict.
    kept = table._flows
    assert len(table.expire(1720.0)) == 11
    assert table._flows is kept


def test_a_small_table_is_never_rebuilt() -> None:
    table = table_with([float(n) for n in range(1000)], idle=10.0, most=5000)
    small = table._flows
    assert len(table.expire(1009.0)) == 1000
    assert table._flows is small
