"""What the memory store adds to the Store contract (tests/contract): its clock and its outages."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.conftest import until
from vmbox.state.memory import FakeClock, MemoryStore
from vmbox.state.store import StoreError, StoreUnavailable, WatchEvent


@contextlib.asynccontextmanager
async def watching(store: MemoryStore, prefix: str) -> AsyncIterator[list[WatchEvent]]:
    events: list[WatchEvent] = []

    async def follow() -> None:
        async for event in store.watch_prefix(prefix, store.revision + 1):
            events.append(event)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0)
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_lease_lives_until_the_clock_reaches_its_deadline() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)

    async def main() -> None:
        lease = await store.grant_lease(3)
        await store.put("/k", b"1", lease=lease)
        async with watching(store, "/") as events:
            assert store.advance(2.999) == 0
            await store.refresh_lease(lease)  # the deadline is now 3 s from here
            assert store.advance(2.999) == 0 and await store.get("/k") is not None
            assert store.advance(0.001) == 1  # exactly the deadline: gone
            await until(lambda: len(events) == 1, 1)
        assert events == [WatchEvent("delete", "/k", b"", store.revision)]

    asyncio.run(main())


def test_expiry_is_also_noticed_by_the_next_call() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)

    async def main() -> None:
        lease = await store.grant_lease(1)
        await store.put("/k", b"1", lease=lease)
        clock.advance(1.0)  # the clock alone: nothing has looked yet
        assert await store.get("/k") is None

    asyncio.run(main())


def test_with_a_real_clock_a_watch_sees_an_untouched_lease_expire() -> None:
    offset = [0.0]
    store = MemoryStore(clock=lambda: time.monotonic() + offset[0])

    async def main() -> None:
        lease = await store.grant_lease(1)
        await store.put("/m/k", b"1", lease=lease)
        async with watching(store, "/m/") as events:
            offset[0] = 0.95  # 50 ms of the TTL left
            await store.put("/other", b"x")  # wakes the watch, which sets its timer anew
            await until(lambda: len(events) == 1, 1)
        assert events[0].kind == "delete" and events[0].key == "/m/k"

    asyncio.run(main())


def test_advance_needs_a_fake_clock() -> None:
    with pytest.raises(TypeError, match="FakeClock"):
        MemoryStore().advance(1.0)
    with pytest.raises(ValueError, match="back"):
        FakeClock().advance(-1.0)


def test_an_unavailable_store_refuses_every_call() -> None:
    store = MemoryStore()
    store.down_reason = "no leader: quorum lost?"

    async def main() -> None:
        lease = await store.grant_lease(5)
        store.available = False
        calls = [
            store.get("/k"),
            store.get_prefix("/"),
            store.put("/k", b"1"),
            store.delete("/k"),
            store.delete_prefix("/"),
            store.compare_and_swap("/k", None, b"1"),
            store.grant_lease(5),
            store.refresh_lease(lease),
            store.revoke_lease(lease),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable, match=r"unavailable for .*\(no leader"):
                await call
        store.available = True
        assert await store.refresh_lease(lease) == 5 and store.revision == 1

    asyncio.run(main())


def test_a_watch_is_silent_through_an_outage_and_goes_on_after_it() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)

    async def main() -> None:
        lease = await store.grant_lease(1)
        await store.put("/w/leased", b"1", lease=lease)
        async with watching(store, "/w/") as events:
            await store.put("/w/a", b"1")
            await until(lambda: len(events) == 1, 1)
            store.available = False
            store.advance(1.0)  # the lease expires while the client cannot see
            await asyncio.sleep(0.01)
            assert len(events) == 1 and store.watch_resumes == 0
            store.available = True
            await until(lambda: len(events) == 2, 1)
            assert store.watch_resumes == 1
        assert [(e.kind, e.key) for e in events] == [("put", "/w/a"), ("delete", "/w/leased")]

    asyncio.run(main())


def test_close_ends_open_watches_and_refuses_calls() -> None:
    store = MemoryStore()

    async def main() -> None:
        async def follow() -> None:
            async for _ in store.watch_prefix("/"):
                pass

        task = asyncio.create_task(follow())
        await asyncio.sleep(0)
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await asyncio.wait_for(task, 1)
        with pytest.raises(StoreError, match="closed"):
            await store.get("/k")

    asyncio.run(main())
