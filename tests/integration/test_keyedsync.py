"""The keyed-table driver (vmbox.state.keyedsync) on the memory store and on a real etcd.

Write-behind, commits, reads shared by the packets that wait for them, entries
that leave the store by themselves, and an outage (the memory store's switch).
Every wait is bounded; the driver's loop is cancelled at the end of each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest

from tests.conftest import Aio, until
from vmbox.keyed import KeyedItem, KeyedTable, Wait
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore
from vmbox.state.keyedsync import KeyedSync
from vmbox.state.memory import FakeClock, MemoryStore
from vmbox.state.store import KeyValue, Put, Store, WatchEvent

pytestmark = pytest.mark.timeout(60)

P = keys.keyed_prefix("kstest", "conn")  # under /vmbox/: the etcd fixture clears it
ITEM = KeyedItem("conn", bytes.decode, lambda value: str(value).encode())
BOUND = 5.0  # seconds any single wait may take before the test fails


class Counting:
    """A Store that counts reads and can hold writes, over another store."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.endpoints = inner.endpoints
        self.reads: list[str] = []
        self.applying = 0  # applies begun (held ones too)
        self.gate: asyncio.Semaphore | None = None  # set: each apply takes one release

    @property
    def watch_resumes(self) -> int:
        return self.inner.watch_resumes

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        self.reads.append(key)
        return await self.inner.get(key, timeout=timeout)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self.inner.get_prefix(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def compare_and_swap(
        self, key: str, expected: bytes | None, value: bytes, *, lease: int = 0
    ) -> bool:
        return await self.inner.compare_and_swap(key, expected, value, lease=lease)

    async def apply(self, puts: Sequence[Put], deletes: Sequence[str] = ()) -> int:
        self.applying += 1
        if self.gate is not None:
            await self.gate.acquire()
        return await self.inner.apply(puts, deletes)

    async def grant_lease(self, ttl: int) -> int:
        return await self.inner.grant_lease(ttl)

    async def refresh_lease(self, lease: int) -> int:
        return await self.inner.refresh_lease(lease)

    async def revoke_lease(self, lease: int) -> None:
        await self.inner.revoke_lease(lease)

    def watch_prefix(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        return self.inner.watch_prefix(prefix, start_revision)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture(params=["memory", "etcd"])
def any_store(request: pytest.FixtureRequest, aio: Aio) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    etcd_store: Store = request.getfixturevalue("store")  # cleans /vmbox/ up afterwards
    yield etcd_store


def make(
    store: Store, *, flush_interval: float = 0.02, slot: float = 5.0, fetch_burst: int = 100
) -> tuple[KeyedTable, KeyedSync]:
    table = KeyedTable(ITEM, fetch_burst=fetch_burst)
    return table, KeyedSync(store, P, table, flush_interval=flush_interval, slot=slot)


@contextlib.asynccontextmanager
async def running(sync: KeyedSync) -> AsyncIterator[asyncio.Task[None]]:
    """The driver's write-behind loop, cancelled and awaited on the way out."""
    task = asyncio.create_task(sync.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sync.slots.close()


async def stored(store: Store, key: str, within: float = BOUND) -> KeyValue:
    """The key's value once it is in the store (AssertionError after `within` s)."""
    deadline = time.monotonic() + within
    while (kv := await store.get(key)) is None:
        assert time.monotonic() < deadline, f"{key} not in the store within {within} s"
        await asyncio.sleep(0.01)
    return kv


async def gone(store: Store, key: str, within: float = BOUND) -> None:
    deadline = time.monotonic() + within
    while await store.get(key) is not None:
        assert time.monotonic() < deadline, f"{key} still in the store after {within} s"
        await asyncio.sleep(0.01)


# -- (a) write-behind -------------------------------------------------------------------------


def test_a_put_is_written_behind_and_a_delete_after_it(any_store: Store, aio: Aio) -> None:
    async def main() -> None:
        table, sync = make(any_store)
        assert table.put("a", "open", time.time() + 60) is None
        assert await any_store.get(P + "a") is None  # queued, not written: no loop yet
        async with running(sync):
            kv = await stored(any_store, P + "a")
            assert kv.value == b"open"
            assert kv.lease != 0  # on its slot's lease: it ends by itself
            await until(lambda: table.queued == 0 and sync.batches >= 1, BOUND)
            table.delete("a", time.time() + 60)
            await gone(any_store, P + "a")
        assert table.counts.writes == 2
        assert table.counts.write_failures == 0

    aio.run(main())


def test_many_puts_share_few_batches_and_one_lease(any_store: Store, aio: Aio) -> None:
    async def main() -> None:
        table, sync = make(any_store, flush_interval=0.2)
        expires = time.time() + 60
        for i in range(300):  # more than one transaction's worth (Store.apply splits it)
            table.put(f"k{i}", str(i), expires)
        async with running(sync):
            await until(lambda: table.counts.writes == 300, BOUND)
        found, _ = await any_store.get_prefix(P)
        assert sorted(kv.key for kv in found) == sorted(P + f"k{i}" for i in range(300))
        assert sync.batches == 1
        assert sync.slots.grants == 1  # one slot for one expiry
        assert len({kv.lease for kv in found}) == 1

    aio.run(main())


# -- (b) commit ---------------------------------------------------------------------------------


def test_a_commit_returns_only_once_the_write_is_in_the_store(any_store: Store, aio: Aio) -> None:
    async def main() -> None:
        # A flush interval far longer than the test: only the commit can write.
        table, sync = make(any_store, flush_interval=60.0)
        async with running(sync):
            assert table.put("a", "durable", time.time() + 60, durable=True) == Wait(
                "conn", "a", commit=True
            )
            started = time.monotonic()
            await asyncio.wait_for(sync.commit("a"), BOUND)
            kv = await any_store.get(P + "a")  # no waiting: it is there already
            assert kv is not None and kv.value == b"durable"
            assert time.monotonic() - started < BOUND
            assert not table.committing("a")
            assert table.get("a", time.time()) == "durable"
            # A commit of a key with nothing to commit is over at once.
            await asyncio.wait_for(sync.commit("a"), 0.5)
            await asyncio.wait_for(sync.commit("never-put"), 0.5)

    aio.run(main())


def test_concurrent_commits_of_many_keys_all_return_written(any_store: Store, aio: Aio) -> None:
    async def main() -> None:
        table, sync = make(any_store, flush_interval=60.0)
        async with running(sync):
            expires = time.time() + 60
            for i in range(20):
                table.put(f"c{i}", str(i), expires, durable=True)
            await asyncio.wait_for(
                asyncio.gather(*(sync.commit(f"c{i}") for i in range(20))), BOUND
            )
            found, _ = await any_store.get_prefix(P)
            assert len(found) == 20
            assert not any(table.committing(f"c{i}") for i in range(20))

    aio.run(main())


# -- (c) fetch ----------------------------------------------------------------------------------


def test_a_key_in_the_store_is_fetched_and_a_missing_one_is_absent(
    any_store: Store, aio: Aio
) -> None:
    async def main() -> None:
        table, sync = make(any_store)
        await any_store.put(P + "x", b"hello")  # another replica's entry
        now = time.time()
        assert table.get("x", now) == Wait("conn", "x")
        await asyncio.wait_for(sync.fetch("x"), BOUND)
        assert table.get("x", now) == "hello"
        sync.settled("x")
        assert table.get("x", now) == "hello"  # an entry now: no read again

        assert table.get("y", now) == Wait("conn", "y")
        await asyncio.wait_for(sync.fetch("y"), BOUND)
        assert table.get("y", now) is None
        sync.settled("y")
        assert table.get("y", now) == Wait("conn", "y")  # the next packet reads again
        assert table.counts.fetches == 2
        assert table.counts.fetch_failed == 0

    aio.run(main())


def test_fifty_packets_waiting_for_one_key_cost_one_read(any_store: Store, aio: Aio) -> None:
    async def main() -> None:
        counting = Counting(any_store)
        table, sync = make(counting)
        await any_store.put(P + "hot", b"v")
        now = time.time()
        for key in ("hot", "cold"):  # one in the store, one not
            waits = {table.get(key, now) for _ in range(50)}
            assert waits == {Wait("conn", key)}
            await asyncio.wait_for(asyncio.gather(*(sync.fetch(key) for _ in range(50))), BOUND)
            assert counting.reads.count(P + key) == 1
            expected = "v" if key == "hot" else None
            # Every packet that waited is decided on the one answer, then settles.
            for _ in range(50):
                assert table.get(key, now) == expected
                sync.settled(key)
        assert table.counts.fetches == 2
        assert table.get("cold", now) == Wait("conn", "cold")  # settled: read again

    aio.run(main())


# -- (d) expiry -----------------------------------------------------------------------------------


def test_an_entry_leaves_etcd_by_itself_after_its_expiry(store: EtcdStore, aio: Aio) -> None:
    slot = 1.0

    async def main() -> None:
        table, sync = make(store, slot=slot)
        async with running(sync):
            expires = time.time() + 1.0
            table.put("e", "short-lived", expires)
            assert (await stored(store, P + "e", within=1.0)).value == b"short-lived"
            while await store.get(P + "e") is not None:
                assert time.time() < expires + slot + 2.0, "the entry outlived its slot"
                await asyncio.sleep(0.05)
            gone_at = time.time()
        assert gone_at >= expires - 0.1, "the entry left before its expiry"
        print(f"gone {gone_at - expires:.2f} s after its expiry (slot {slot} s)")

    aio.run(main(), timeout=20)


def test_an_entry_leaves_the_memory_store_at_its_slots_end(aio: Aio) -> None:
    async def main() -> None:
        clock = FakeClock(1_700_000_000.0)  # on a multiple of the slot
        store = MemoryStore(clock=clock)
        table = KeyedTable(ITEM)
        sync = KeyedSync(store, P, table, flush_interval=0.02, slot=5.0, clock=clock)
        async with running(sync):
            table.put("e", "v", clock() + 7.0)  # its slot ends at +10
            await stored(store, P + "e")
        store.advance(9.9)
        assert await store.get(P + "e") is not None
        store.advance(0.2)
        assert await store.get(P + "e") is None

    aio.run(main())


def test_a_slot_lease_gone_under_the_driver_is_granted_anew(any_store: Store, aio: Aio) -> None:
    async def main() -> None:
        table, sync = make(any_store)
        expires = time.time() + 60
        async with running(sync):
            table.put("a", "1", expires)
            lease = (await stored(any_store, P + "a")).lease
            await any_store.revoke_lease(lease)  # etcd lost it (a restart, say)
            await gone(any_store, P + "a")
            table.put("b", "2", expires)  # same slot: its cached lease is gone
            kv = await stored(any_store, P + "b")
            assert kv.value == b"2" and kv.lease not in (0, lease)
        assert table.counts.write_failures == 1  # the batch on the lost lease, retried
        assert sync.slots.grants == 2

    aio.run(main())


# -- (e) the store away --------------------------------------------------------------------------


def test_writes_outlive_an_outage_and_commits_are_released_meanwhile(aio: Aio) -> None:
    async def main() -> None:
        store = MemoryStore()
        table, sync = make(store)
        revision = store.revision
        store.available = False
        expires = time.time() + 60
        table.put("a", "1", expires)
        assert table.put("b", "2", expires, durable=True) == Wait("conn", "b", commit=True)
        async with running(sync):
            # Released though nothing was written: the packet passes on what memory holds.
            await asyncio.wait_for(sync.commit("b"), BOUND)
            assert not table.committing("b")
            assert table.get("b", time.time()) == "2"
            await until(lambda: table.counts.write_failures >= 6 and table.queued == 2, BOUND)
            assert sync.batches == 0
            assert store.revision == revision  # nothing reached the store
            # A read meanwhile fails, and counts as absent.
            assert table.get("z", time.time()) == Wait("conn", "z")
            await asyncio.wait_for(sync.fetch("z"), BOUND)
            assert table.get("z", time.time()) is None
            assert table.counts.fetch_failed == 1
            sync.settled("z")

            store.available = True
            await until(lambda: table.queued == 0 and sync.batches >= 1, BOUND)
            assert (await stored(store, P + "a")).value == b"1"
            assert (await stored(store, P + "b")).value == b"2"
        assert table.counts.writes == 2

    aio.run(main())


# -- found by these tests and fixed ---------------------------------------------------------


def test_a_second_durable_put_waits_for_its_own_write(any_store: Store, aio: Aio) -> None:
    async def main() -> None:
        counting = Counting(any_store)
        counting.gate = gate = asyncio.Semaphore(0)
        table, sync = make(counting, flush_interval=60.0)
        async with running(sync):
            try:
                expires = time.time() + 60
                table.put("k", "v1", expires, durable=True)
                first = asyncio.ensure_future(sync.commit("k"))
                await until(lambda: counting.applying == 1, BOUND)  # v1 is on its way
                table.put("k", "v2", expires, durable=True)
                second = asyncio.ensure_future(sync.commit("k"))
                gate.release()  # v1 lands; v2's apply is then held at the gate
                await until(lambda: counting.applying == 2, BOUND)
                await asyncio.sleep(0.05)
                assert not second.done(), "the commit of v2 ended before v2 was written"
                gate.release()
                await asyncio.wait_for(asyncio.gather(first, second), BOUND)
                kv = await any_store.get(P + "k")
                assert kv is not None and kv.value == b"v2"
            finally:
                for _ in range(10):
                    gate.release()

    aio.run(main())
