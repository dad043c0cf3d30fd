"""The resize guard's watcher (vmbox.state.epochsync) on the memory store.

The guard's own rules are tests/unit/test_epoch.py's; here: acks are written
on the member's lease with the set and the window they declare, the guard
lifts once every member acked and the declared window began, a lost ack is
written again, and a replica that cannot write stays guarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from tests.conftest import until
from vmbox.group import Group
from vmbox.state import epochsync, keys
from vmbox.state.epoch import Ack, ResizeGuard, parse_ack
from vmbox.state.epochsync import EpochSync
from vmbox.state.memory import FakeClock, MemoryStore

WINDOW = 1.0


class Replica:
    """One replica's side: its member key on its lease, and its EpochSync."""

    def __init__(self, store: MemoryStore, me: str, clock: Callable[[], float], window: float):
        self.store = store
        self.me = me
        self.lease = 0
        self.groups: list[Group] = []
        self.sync = EpochSync(store, "t", ResizeGuard(me, window), self.groups.append, clock=clock)

    async def join(self) -> None:
        self.lease = await self.store.grant_lease(10)
        await self.store.put(keys.member_key("t", self.me), b"{}", lease=self.lease)

    def current_lease(self) -> int:
        return self.lease

    async def ack(self) -> Ack | None:
        kv = await self.store.get(keys.ack_key("t", self.me))
        return None if kv is None else parse_ack(kv)

    @property
    def group(self) -> Group:
        return self.groups[-1]


@contextlib.asynccontextmanager
async def running(*replicas: Replica) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(r.sync.run(r.current_lease)) for r in replicas]
    try:
        await until(lambda: all(r.groups for r in replicas), 1)  # each applied its first group
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def stored(replica: Replica, lease: int) -> Ack:
    """Wait until the replica's ack is in the store on `lease`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1
    while True:
        kv = await replica.store.get(keys.ack_key("t", replica.me))
        if kv is not None and kv.lease == lease:
            ack = parse_ack(kv)
            assert ack is not None
            return ack
        assert loop.time() < deadline, f"no ack of {replica.me} on lease {lease:x}"
        await asyncio.sleep(0.005)


async def acked(replica: Replica, names: set[str]) -> Ack:
    """Wait until the replica's ack holds `names` and its guard has seen every member's."""
    members = frozenset(names)
    await until(lambda: replica.sync.guard.acks.get(replica.me) == members, 1)
    await until(lambda: all(replica.sync.guard.acks.get(m) == members for m in members), 1)
    ack = await replica.ack()
    assert ack is not None
    return ack


def test_a_lone_replica_acks_its_set_and_lifts_at_the_window_it_declared() -> None:
    clock = FakeClock(1000.2)
    store = MemoryStore(clock=clock)
    one = Replica(store, "r1", clock, WINDOW)

    async def main() -> None:
        async with running(one):
            assert one.group == Group(members=(), me="r1", previous=())  # a fresh replica
            await one.join()
            ack = await acked(one, {"r1"})
            kv = await store.get(keys.ack_key("t", "r1"))
            assert kv is not None and kv.lease == one.lease
            assert ack == Ack(frozenset({"r1"}), revision=2, window=1001)
            assert one.group == Group(members=("r1",), me="r1", previous=())  # nothing yet
            assert one.sync.due == 1001.0
            one.sync.catch_up(1000.999)
            assert one.sync.guard.guarded
            clock.advance(0.8)
            one.sync.catch_up(clock())  # the data plane, at the first packet of window 1001
            assert one.group == Group(members=("r1",), me="r1")
            assert one.sync.guard.lifts == 1 and one.sync.due == float("inf")

    asyncio.run(main())


def test_a_join_keeps_both_guarded_until_both_acked() -> None:
    clock = FakeClock(1000.5)
    store = MemoryStore(clock=clock)
    one, two = Replica(store, "r1", clock, WINDOW), Replica(store, "r2", clock, WINDOW)

    async def main() -> None:
        async with running(one):
            await one.join()
            await acked(one, {"r1"})
            clock.advance(1.0)
            one.sync.catch_up(clock())
            assert one.group.previous is None
            await two.join()
            await until(lambda: one.group.members == ("r1", "r2"), 1)
            # r1 keeps {r1} and {r1, r2}: at most its share under each (the union's split).
            assert one.group.previous == ("r1", "r2")
            async with running(two):
                await acked(one, {"r1", "r2"})
                await acked(two, {"r1", "r2"})
                assert two.group == Group(members=("r1", "r2"), me="r2", previous=())
                assert one.group.previous is not None
                for replica in (one, two):
                    replica.sync.catch_up(clock())
                    assert replica.sync.guard.guarded  # the declared window has not begun
                clock.advance(1.0)
                for replica in (one, two):
                    replica.sync.catch_up(clock())
                    assert replica.group == Group(members=("r1", "r2"), me=replica.me)

    asyncio.run(main())


def test_the_timer_lifts_the_guard_without_a_packet() -> None:
    store = MemoryStore()
    one = Replica(store, "r1", time.time, 0.05)  # a window of 50 ms of real time

    async def main() -> None:
        async with running(one):
            await one.join()
            await until(lambda: one.groups[-1] == Group(members=("r1",), me="r1"), 1)
            assert one.sync.guard.lifts == 1

    asyncio.run(main())


def test_an_ack_deleted_behind_its_back_is_written_again() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    one = Replica(store, "r1", clock, WINDOW)

    async def main() -> None:
        async with running(one):
            await one.join()
            first = await acked(one, {"r1"})
            assert await store.delete(keys.ack_key("t", "r1"))
            assert await stored(one, one.lease) == first

    asyncio.run(main())


def test_the_ack_follows_the_member_to_a_new_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(epochsync, "LEASE_CHECK", 0.01)
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    one = Replica(store, "r1", clock, WINDOW)

    async def main() -> None:
        async with running(one):
            await one.join()
            await acked(one, {"r1"})
            old = one.lease
            await one.join()  # registered again on a new lease (the old one was lost)
            await store.revoke_lease(old)
            ack = await stored(one, one.lease)
            assert ack.members == {"r1"} and one.lease != old

    asyncio.run(main())


def test_a_replica_that_cannot_write_its_ack_stays_guarded() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    one = Replica(store, "r1", clock, WINDOW)

    async def main() -> None:
        await one.join()
        store_lease, one.lease = one.lease, 0x5EED  # a lease the store never granted
        async with running(one):
            await until(lambda: one.sync.ack_errors >= 1, 1)
            clock.advance(5.0)
            one.sync.catch_up(clock())
            assert one.sync.guard.guarded and await one.ack() is None
            one.lease = store_lease
            await acked(one, {"r1"})  # written at the next retry
            clock.advance(1.0)
            one.sync.catch_up(clock())
            assert not one.sync.guard.guarded

    asyncio.run(main())


def test_a_leaving_replica_takes_nothing() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    one = Replica(store, "r1", clock, WINDOW)

    async def main() -> None:
        async with running(one):
            await one.join()
            await acked(one, {"r1"})
            clock.advance(1.0)
            one.sync.catch_up(clock())
            assert one.group.previous is None
            one.sync.leaving()
            assert one.group == Group(members=("r1",), me="r1", previous=())

    asyncio.run(main())
