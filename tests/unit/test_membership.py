"""Membership on the memory store: registration on leases, listing, following, expiry.

tests/integration/test_membership.py runs the same module on a real etcd with
real time; here leases expire on a FakeClock, so nothing waits out a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tests.conftest import until
from vmbox.state import keys
from vmbox.state.membership import (
    MemberInfo,
    Membership,
    latest_only,
    list_members,
    watch_members,
    watch_snapshots,
)
from vmbox.state.memory import FakeClock, MemoryStore


@contextlib.asynccontextmanager
async def running(member: Membership) -> AsyncIterator[asyncio.Task[None]]:
    """Run a membership; on exit cancel it without leaving (as a crashed replica would)."""
    task = asyncio.create_task(member.run())
    try:
        await asyncio.wait_for(member.registered.wait(), 1)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def following(store: MemoryStore) -> AsyncIterator[list[dict[str, MemberInfo]]]:
    """Collect the snapshots of watch_members("t") while the block runs."""
    snapshots: list[dict[str, MemberInfo]] = []

    async def follow() -> None:
        async for members in watch_members(store, "t", retry=0.01):
            snapshots.append(members)

    task = asyncio.create_task(follow())
    await until(lambda: len(snapshots) > 0, 1)
    try:
        yield snapshots
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def groups(snapshots: list[dict[str, MemberInfo]]) -> list[list[str]]:
    return [sorted(snapshot) for snapshot in snapshots]


def test_members_register_on_their_own_leases_and_are_listed() -> None:
    store = MemoryStore(clock=FakeClock())

    async def main() -> None:
        one = Membership(store, "t", "r1", {"pid": 1, "metrics": "127.0.0.1:9001"})
        two = Membership(store, "t", "r2", {"pid": 2})
        async with running(one), running(two):
            members = await list_members(store, "t")
            assert sorted(members) == ["r1", "r2"]
            assert members["r1"].info == {"pid": 1, "metrics": "127.0.0.1:9001"}
            assert members["r1"].lease == one.lease != 0 and one.lease != two.lease
            key = await store.get(keys.member_key("t", "r2"))
            assert key is not None and key.lease == two.lease
            assert members["r2"].mod_revision == key.mod_revision
            await one.set_info({"pid": 1, "draining": True})
            info = (await list_members(store, "t"))["r1"]
            assert info.info == {"pid": 1, "draining": True} and info.lease == one.lease

    asyncio.run(main())


def test_a_follower_sees_joins_and_leaves_in_order() -> None:
    store = MemoryStore(clock=FakeClock())

    async def main() -> None:
        async with following(store) as snapshots:
            one = Membership(store, "t", "r1", {})
            two = Membership(store, "t", "r2", {}, ttl=1)  # its run() sees leave() within 1/3 s
            async with running(one), running(two) as task_two:
                await until(lambda: groups(snapshots)[-1] == ["r1", "r2"], 1)
                await two.leave()
                await asyncio.wait_for(task_two, 1)  # run() returns after leave()
                await until(lambda: groups(snapshots)[-1] == ["r1"], 1)
        assert groups(snapshots) == [[], ["r1"], ["r1", "r2"], ["r1"]]

    asyncio.run(main())


def test_a_crashed_member_disappears_when_its_lease_expires() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)

    async def main() -> None:
        async with following(store) as snapshots:
            async with running(Membership(store, "t", "gone", {}, ttl=3)):
                await until(lambda: groups(snapshots)[-1] == ["gone"], 1)
            # Cancelled without leave(): nobody refreshes the lease any more.
            assert store.advance(2.9) == 0
            assert "gone" in await list_members(store, "t")
            assert store.advance(0.1) == 1
            await until(lambda: groups(snapshots)[-1] == [], 1)
        assert await list_members(store, "t") == {}

    asyncio.run(main())


def test_a_member_whose_lease_was_revoked_registers_again() -> None:
    store = MemoryStore(clock=FakeClock())

    async def main() -> None:
        again: list[int] = []  # the replica's resize guard starts over on these
        member = Membership(
            store, "t", "r1", {"pid": 1}, ttl=1, on_registered_again=again.append
        )  # refreshed every 1/3 s
        async with running(member):
            first = member.lease
            assert again == []  # the first registration is no "again"
            await store.revoke_lease(first)  # what the controller does to a stuck replica
            assert await list_members(store, "t") == {}
            await until(lambda: member.registrations == 2, 1)
            members = await list_members(store, "t")
            assert members["r1"].lease == member.lease != first
            assert members["r1"].info == {"pid": 1}
            assert again == [member.lease]

    asyncio.run(main())


def test_registration_waits_for_the_store_and_says_so() -> None:
    store = MemoryStore(clock=FakeClock())

    async def main() -> None:
        store.available = False
        member = Membership(store, "t", "r1", {})
        task = asyncio.create_task(member.run())
        await until(lambda: member.last_error is not None, 1)
        assert not member.registered.is_set() and "unavailable" in str(member.last_error)
        store.available = True
        await asyncio.wait_for(member.registered.wait(), 1)
        assert member.last_error is None and "r1" in await list_members(store, "t")
        await member.leave()
        assert await list_members(store, "t") == {}
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_snapshots_drop_values_the_parser_rejects_and_keep_odd_members() -> None:
    store = MemoryStore()

    async def main() -> None:
        prefix = keys.members_prefix("t")
        await store.put(prefix + "r1", b"not json")
        await store.put(prefix + "r2", b'{"pid": 2}')
        members = await list_members(store, "t")
        assert members["r1"].info == {"raw": "not json"} and members["r2"].info == {"pid": 2}

        def pid(kv: Any) -> int | None:
            return 7 if kv.value.startswith(b"{") else None

        seen: list[tuple[int, dict[str, int]]] = []

        async def follow() -> None:
            async for snapshot in watch_snapshots(store, prefix, pid, retry=0.01):
                seen.append(snapshot)

        task = asyncio.create_task(follow())
        await until(lambda: len(seen) == 1, 1)
        last = await store.put(prefix + "r1", b"{}")
        await store.put(prefix + "r2", b"garbage")
        await until(lambda: len(seen) == 3, 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert seen == [(3, {"r2": 7}), (last, {"r1": 7, "r2": 7}), (last + 1, {"r1": 7})]

    asyncio.run(main())


def test_a_busy_consumer_of_snapshots_gets_the_newest_and_skips_the_rest() -> None:
    async def main() -> None:
        produced = asyncio.Queue[int | None]()

        async def source() -> AsyncIterator[int]:
            while (item := await produced.get()) is not None:
                yield item

        got: list[int] = []
        busy = asyncio.Event()

        async def consume() -> None:
            async with contextlib.aclosing(latest_only(source())) as items:
                async for item in items:
                    got.append(item)
                    await busy.wait()  # the consumer's write, taking its time
                    busy.clear()

        task = asyncio.create_task(consume())
        produced.put_nowait(1)
        await until(lambda: got == [1], 1)
        for item in range(2, 9):  # while it is busy
            produced.put_nowait(item)
        await until(lambda: produced.empty(), 1)
        await asyncio.sleep(0.01)
        busy.set()
        await until(lambda: got == [1, 8], 1)  # 2..7 were replaced before it looked
        produced.put_nowait(9)
        busy.set()
        await until(lambda: got == [1, 8, 9], 1)
        produced.put_nowait(None)  # the source ends: so does the consumer
        busy.set()
        await asyncio.wait_for(task, 1)

    asyncio.run(main())


def test_latest_only_passes_the_source_error_on_and_stops_its_reader_when_closed() -> None:
    async def main() -> None:
        async def failing() -> AsyncIterator[int]:
            yield 1
            raise RuntimeError("the watch broke")

        seen = []
        try:
            async for item in latest_only(failing()):
                seen.append(item)
        except RuntimeError as exc:
            assert str(exc) == "the watch broke"
        else:
            raise AssertionError("the source's error was swallowed")
        assert seen == [1]

        before = len(asyncio.all_tasks())

        async def endless() -> AsyncIterator[int]:
            n = 0
            while True:
                n += 1
                yield n
                await asyncio.sleep(0)

        async with contextlib.aclosing(latest_only(endless())) as items:
            async for _ in items:
                break
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == before  # the reader is gone with it

    asyncio.run(main())
