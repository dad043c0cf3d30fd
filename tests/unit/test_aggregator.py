"""The aggregator (vmbox.state.aggregator) on the memory store: one leader, its
summaries reach every replica, a dead leader is replaced, stale summaries are ignored.

The same module runs against a real etcd in tests/integration/test_aggregator.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from tests.conftest import until
from vmbox import sharing
from vmbox.state import keys
from vmbox.state.aggregator import Aggregation
from vmbox.state.demand import Report
from vmbox.state.epoch import encode_ack
from vmbox.state.memory import MemoryStore
from vmbox.state.store import Store
from vmbox.state.summary import DemandSummary, encode_demand

SERVICE = "t"


class Member:
    """A replica's parts the aggregator touches: a lease, an ack, a report."""

    def __init__(self, store: Store, me: str) -> None:
        self.store, self.me, self.lease = store, me, 0
        self.acks: list[tuple[dict[str, frozenset[str]], dict[str, int]]] = []
        self.demand: list[dict[str, Report]] = []
        self.ticks: list[int | None] = []
        self.aggregation = Aggregation(
            store,
            SERVICE,
            me,
            lambda: self.lease,
            on_acks=lambda acks, windows: self.acks.append((acks, windows)),
            on_demand=self.took,
            interval=0.05,
        )

    def took(self, reports: dict[str, Report], tick: int | None) -> None:
        self.demand.append(reports)
        self.ticks.append(tick)

    async def join(self, ttl: int = 10) -> None:
        self.lease = await self.store.grant_lease(ttl)
        await self.store.put(keys.member_key(SERVICE, self.me), b"{}", lease=self.lease)

    async def ack(self, members: set[str], window: int) -> None:
        value = encode_ack(members, 1, window)
        await self.store.put(keys.ack_key(SERVICE, self.me), value, lease=self.lease)

    async def report(self, report: dict[str, int]) -> None:
        value = json.dumps(report).encode()
        await self.store.put(keys.demand_key(SERVICE, self.me), value, lease=self.lease)


@contextlib.asynccontextmanager
async def running(*members: Member) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(m.aggregation.run()) for m in members]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def leaders(*members: Member) -> list[str]:
    return [m.me for m in members if m.aggregation.leading]


async def one_leader_and_its_summaries_reach_everyone(store: Store) -> None:
    group = [Member(store, f"r{i}") for i in range(4)]
    for m in group:
        await m.join()
    async with running(*group):
        await until(lambda: len(leaders(*group)) == 1, 2)
        names = {m.me for m in group}
        for m in group:
            await m.ack(names, 7)
        want_acks = (dict.fromkeys(names, frozenset(names)), dict.fromkeys(names, 7))
        await until(lambda: all(m.acks and m.acks[-1] == want_acks for m in group), 2)
        assert all(m.acks[0] == ({}, {}) for m in group)  # before the acks: none complete
        assert all(len(m.acks) <= 3 for m in group)  # not one summary per ack
        await group[0].report({"10.0.0.1": 40})
        await group[2].report({"10.0.0.1": 10, "10.0.0.2": 3})
        want = {"r0": {"10.0.0.1": 40}, "r2": {"10.0.0.1": 10, "10.0.0.2": 3}}
        await until(lambda: all(m.demand and m.demand[-1] == want for m in group), 2)
        taken = [len(m.demand) for m in group]
        await asyncio.sleep(0.3)  # six intervals of unchanged reports: no new summary...
        for m, before in zip(group, taken, strict=True):
            # ...but the last tick before a window begins (one in 0.3 s at most).
            again = m.ticks[before:]
            assert len(again) <= 1 and all(
                t is not None and sharing.owed_tick(t, 1.0, 0.05) == t for t in again
            ), again
        ticks = [t for t in group[0].ticks if t is not None]
        assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
        assert len(leaders(*group)) == 1
        kv = await store.get(keys.summary_key(SERVICE, "demand"))
        leader = next(m for m in group if m.aggregation.leading)
        assert kv is not None and kv.lease == leader.lease  # it goes with its writer


def test_one_leader_and_its_summaries_reach_everyone() -> None:
    asyncio.run(one_leader_and_its_summaries_reach_everyone(MemoryStore()))


async def a_dead_leader_is_replaced_and_a_stale_summary_is_ignored(store: Store) -> None:
    group = [Member(store, f"r{i}") for i in range(3)]
    for m in group:
        await m.join()
    async with running(*group):
        await until(lambda: len(leaders(*group)) == 1, 2)
        await group[1].report({"a": 5})
        await until(lambda: all(m.demand for m in group), 2)
        first = next(m for m in group if m.aggregation.leading)
        await store.revoke_lease(first.lease)  # as the controller does for an exited replica
        first.lease = 0
        others = [m for m in group if m is not first]
        replaced = await until(lambda: len(leaders(*others)) == 1, 2)
        assert replaced < 1.0
        if first is not group[1]:
            await group[1].report({"a": 6})
            await until(lambda: all(m.demand[-1] == {"r1": {"a": 6}} for m in others), 2)
        # A summary older than the last taken changes nothing (an old leader's write).
        taken = [len(m.demand) for m in others]
        stale = encode_demand(DemandSummary(1, {"r9": {"b": 1}}))
        leader = next(m for m in others if m.aggregation.leading)
        await store.put(keys.summary_key(SERVICE, "demand"), stale, lease=leader.lease)
        await asyncio.sleep(0.2)
        assert all(m.demand[-1] != {"r9": {"b": 1}} for m in others)
        assert [len(m.demand) for m in others] >= taken


def test_a_dead_leader_is_replaced_and_a_stale_summary_is_ignored() -> None:
    asyncio.run(a_dead_leader_is_replaced_and_a_stale_summary_is_ignored(MemoryStore()))


def test_nobody_leads_without_a_lease_and_garbage_is_survived() -> None:
    async def main() -> None:
        store = MemoryStore()
        one = Member(store, "r0")
        await store.put(keys.summary_key(SERVICE, "acks"), b"not json")
        async with running(one):
            await asyncio.sleep(0.3)
            assert not one.aggregation.leading and not one.acks
            await one.join()
            await until(lambda: one.aggregation.leading, 2)

    asyncio.run(main())
