"""One suite, two stores: MemoryStore must behave as a real etcd does wherever vmbox looks.

Every test runs against vmbox.state.memory.MemoryStore and against EtcdStore
on the session's private etcd (tests/conftest.py); whatever etcd does is the
truth. Time passes for real on etcd (leases of 1 s, whose expiry etcd notices
within about half a second more) and on a FakeClock for the memory store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import Aio, until
from vmbox.etcdserver import EtcdServer
from vmbox.state.etcd import connect
from vmbox.state.memory import FakeClock, MemoryStore
from vmbox.state.store import (
    MAX_TXN_OPS,
    KeyValue,
    LeaseLost,
    Put,
    Store,
    StoreError,
    WatchEvent,
)

pytestmark = pytest.mark.timeout(60)

P = "/vmbox/contract/"  # every key of the suite is under it (the etcd fixture clears /vmbox/)


@dataclass
class Subject:
    """A store under test and how time passes for it."""

    kind: str
    store: Store
    pass_time: Callable[[float], Awaitable[None]]
    open_another: Callable[[], Awaitable[Store]]  # a separate store to close


def _memory() -> Subject:
    store = MemoryStore(clock=FakeClock())

    async def pass_time(seconds: float) -> None:
        store.advance(seconds)

    async def another() -> Store:
        return MemoryStore(clock=FakeClock())

    return Subject("memory", store, pass_time, another)


@pytest.fixture(params=["memory", "etcd"])
def subject(request: pytest.FixtureRequest, aio: Aio) -> Iterator[Subject]:
    if request.param == "memory":
        yield _memory()
        return
    etcd: EtcdServer = request.getfixturevalue("etcd")
    store: Store = request.getfixturevalue("store")  # cleans /vmbox/ up afterwards

    async def another() -> Store:
        return await connect(etcd.endpoints, timeout=10)

    yield Subject("etcd", store, asyncio.sleep, another)


@pytest.fixture(params=["memory", "etcd"])
def fresh(request: pytest.FixtureRequest, aio: Aio) -> Iterator[Store]:
    """A store nothing was ever written to."""
    if request.param == "memory":
        yield MemoryStore()
        return
    with EtcdServer() as server:
        store = aio.run(connect(server.endpoints, timeout=10))
        yield store
        aio.run(store.close())


async def _gone(store: Store, key: str, within: float = 3.0) -> None:
    """The key disappears within `within` s (etcd notices an expiry up to ~0.5 s late)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while await store.get(key) is not None:
        assert loop.time() < deadline, f"{key} outlived its lease"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def watching(store: Store, prefix: str, start: int = 0) -> AsyncIterator[list[WatchEvent]]:
    """Collect the events of one watch while the block runs."""
    events: list[WatchEvent] = []

    async def follow() -> None:
        async for event in store.watch_prefix(prefix, start):
            events.append(event)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)  # an etcd watch started from "now" must be in place
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _settled(store: Store, events: list[WatchEvent], marker: str) -> list[WatchEvent]:
    """Write `marker` and wait for its event: everything before it has been delivered."""
    revision = await store.put(marker, b"end")
    await until(lambda: any(e.revision == revision for e in events), 5)
    assert [e.revision for e in events].count(revision) == 1
    return [e for e in events if e.key != marker]


def _shape(events: list[WatchEvent]) -> list[tuple[str, str, bytes]]:
    return [(e.kind, e.key.removeprefix(P), e.value) for e in events]


def test_an_empty_store_is_at_revision_one(fresh: Store, aio: Aio) -> None:
    async def main() -> None:
        assert await fresh.get_prefix("/") == ([], 1)
        for empty in (fresh.get_prefix(""), fresh.get(""), fresh.put("", b"1")):
            with pytest.raises(StoreError, match="key is not provided"):
                await empty
        assert await fresh.get(P + "a") is None
        assert await fresh.put(P + "a", b"1") == 2
        assert await fresh.get_prefix(P) == ([KeyValue(P + "a", b"1", 2)], 2)

    aio.run(main())


def test_each_write_adds_one_revision_and_reads_add_none(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        first = await store.put(P + "a", b"1")
        assert await store.put(P + "a", b"1") == first + 1  # the same value is a new write
        got = await store.get(P + "a")
        assert got == KeyValue(P + "a", b"1", first + 1, 0)
        assert await store.get(P + "missing") is None
        assert (await store.get_prefix(P))[1] == first + 1
        # None of these writes anything.
        assert await store.delete(P + "missing") is False
        assert await store.delete_prefix(P + "none/") == 0
        assert not await store.compare_and_swap(P + "a", b"other", b"2")
        assert not await store.compare_and_swap(P + "a", None, b"2")
        lease = await store.grant_lease(30)
        await store.refresh_lease(lease)
        await store.revoke_lease(lease)  # no keys on it
        assert (await store.get_prefix(P))[1] == first + 1
        assert await store.put(P + "b", b"2") == first + 2

    aio.run(main())


def test_get_prefix_lists_only_the_prefix_in_key_order(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        for key in ("t/b", "t/a", "ta", "t/a/x", "s/z"):
            last = await store.put(P + key, key.encode())
        kvs, revision = await store.get_prefix(P + "t/")
        assert [kv.key.removeprefix(P) for kv in kvs] == ["t/a", "t/a/x", "t/b"]
        assert [kv.value for kv in kvs] == [b"t/a", b"t/a/x", b"t/b"]
        assert revision == last
        exact, _ = await store.get_prefix(P + "ta")
        assert [kv.key for kv in exact] == [P + "ta"]

    aio.run(main())


def test_delete_and_delete_prefix_say_what_they_removed(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        await store.put(P + "d/1", b"1")
        await store.put(P + "d/2", b"2")
        before = await store.put(P + "keep", b"k")
        assert await store.delete(P + "keep") is True
        assert await store.delete(P + "keep") is False
        assert await store.delete_prefix(P + "d/") == 2  # one transaction: one revision
        assert (await store.get_prefix(P))[0] == []
        assert (await store.get_prefix(P))[1] == before + 2

    aio.run(main())


def test_compare_and_swap(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        key = P + "x"
        assert not await store.compare_and_swap(key, b"1", b"2")  # expected a value, none there
        assert await store.compare_and_swap(key, None, b"1")
        assert not await store.compare_and_swap(key, None, b"2")  # only if absent
        assert not await store.compare_and_swap(key, b"0", b"2")  # mismatch
        assert await store.compare_and_swap(key, b"1", b"2")
        got = await store.get(key)
        assert got is not None and got.value == b"2"
        assert got.mod_revision == (await store.get_prefix(P))[1]
        lease = await store.grant_lease(30)
        assert await store.compare_and_swap(key, b"2", b"3", lease=lease)
        got = await store.get(key)
        assert got is not None and got.lease == lease
        await store.revoke_lease(lease)
        assert await store.get(key) is None
        # A dead lease only matters when the swap would write.
        assert not await store.compare_and_swap(key, b"nope", b"4", lease=lease)
        with pytest.raises(LeaseLost):
            await store.compare_and_swap(key, None, b"4", lease=lease)

    aio.run(main())


def test_revoke_deletes_the_keys_on_the_lease_in_one_revision(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        lease = await store.grant_lease(30)
        assert lease != 0
        await store.put(P + "m/2", b"b", lease=lease)
        await store.put(P + "m/1", b"a", lease=lease)
        await store.put(P + "m/3", b"c", lease=lease)
        await store.put(P + "m/3", b"c")  # written again without the lease: off it
        got = await store.get(P + "m/1")
        assert got is not None and got.lease == lease
        assert await store.refresh_lease(lease) == 30
        async with watching(store, P + "m/") as events:
            await store.revoke_lease(lease)
            seen = await _settled(store, events, P + "m/end")
        assert _shape(seen) == [("delete", "m/1", b""), ("delete", "m/2", b"")]
        assert seen[0].revision == seen[1].revision
        assert [kv.key for kv in (await store.get_prefix(P + "m/"))[0]] == [P + "m/3", P + "m/end"]
        await store.revoke_lease(lease)  # again: no error
        with pytest.raises(LeaseLost):
            await store.refresh_lease(lease)
        with pytest.raises(LeaseLost):
            await store.put(P + "m/1", b"again", lease=lease)
        with pytest.raises(LeaseLost):
            await store.put(P + "m/1", b"never granted", lease=0x5EED)
        assert await store.get(P + "m/1") is None

    aio.run(main())


def test_a_lease_expires_unless_refreshed(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        lease = await store.grant_lease(1)
        await store.put(P + "e/k", b"x", lease=lease)
        async with watching(store, P + "e/") as events:
            await subject.pass_time(0.6)
            assert await store.refresh_lease(lease) == 1
            await subject.pass_time(0.6)  # 1.2 s after the grant, 0.6 s after the refresh
            assert await store.get(P + "e/k") is not None
            await subject.pass_time(1.0)
            await _gone(store, P + "e/k")
            seen = await _settled(store, events, P + "e/end")
        assert _shape(seen) == [("delete", "e/k", b"")]
        with pytest.raises(LeaseLost):
            await store.refresh_lease(lease)
        with pytest.raises(LeaseLost):
            await store.put(P + "e/k", b"y", lease=lease)

    aio.run(main())


def test_a_watch_delivers_every_event_once_in_order(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        await store.put(P + "w/before", b"0")  # before a watch from now: not delivered
        async with watching(store, P + "w/") as events:
            for i in range(20):
                await store.put(P + f"w/{i % 3}", str(i).encode())
            await store.put(P + "wx", b"beside the prefix")
            await store.delete(P + "w/0")
            await store.put(P + "w/a", b"1")
            await store.put(P + "w/b", b"2")
            await store.delete_prefix(P + "w/")
            seen = await _settled(store, events, P + "w/end")
        puts = [("put", f"w/{i % 3}", str(i).encode()) for i in range(20)]
        deletes = [("delete", f"w/{k}", b"") for k in ("1", "2", "a", "b", "before")]
        middle = [("delete", "w/0", b""), ("put", "w/a", b"1"), ("put", "w/b", b"2")]
        assert _shape(seen) == [*puts, *middle, *deletes]  # the prefix's deletes share one
        revisions = [e.revision for e in seen]
        assert revisions == sorted(revisions) and len(set(revisions)) == 24

    aio.run(main())


def test_a_watch_from_a_revision_replays_the_history(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        first = await store.put(P + "h/a", b"1")
        await store.put(P + "other", b"no")
        await store.put(P + "h/a", b"2")
        await store.delete(P + "h/a")
        async with (
            watching(store, P + "h/", first) as events,
            watching(store, P + "h/", first + 2) as later,
        ):
            await store.put(P + "h/b", b"3")
            seen = await _settled(store, events, P + "h/end")
            seen_later = await _settled(store, later, P + "h/end2")
        assert _shape(seen) == [
            ("put", "h/a", b"1"),
            ("put", "h/a", b"2"),
            ("delete", "h/a", b""),
            ("put", "h/b", b"3"),
        ]
        assert seen[0].revision == first
        assert _shape(seen_later) == [*_shape(seen)[1:], ("put", "h/end", b"end")]

    aio.run(main())


def test_a_watch_from_a_future_revision_waits_for_it(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        _, now = await store.get_prefix(P)
        async with watching(store, P + "f/", now + 3) as events:
            for i in range(4):
                await store.put(P + "f/k", str(i).encode())
            seen = await _settled(store, events, P + "f/end")
        assert _shape(seen) == [("put", "f/k", b"2"), ("put", "f/k", b"3")]
        assert seen[0].revision == now + 3

    aio.run(main())


def test_a_closed_store_refuses_calls(subject: Subject, aio: Aio) -> None:
    async def main() -> None:
        other = await subject.open_another()
        await other.put(P + "c", b"1")
        await other.close()
        with pytest.raises(StoreError):
            await other.get(P + "c")
        with pytest.raises(StoreError):
            await other.put(P + "c", b"2")
        with pytest.raises(StoreError):
            await anext(aiter(other.watch_prefix(P)))

    aio.run(main())


def test_apply_writes_puts_and_deletes_in_one_revision(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        await store.put(P + "a/gone", b"0")
        await store.put(P + "a/also", b"0")
        before = await store.put(P + "a/kept", b"0")
        lease = await store.grant_lease(30)
        puts = [Put(P + "a/z", b"1"), Put(P + "a/kept", b"2", lease), Put(P + "a/b", b"3")]
        deletes = [P + "a/gone", P + "a/missing", P + "a/also", P + "a/gone"]  # repeats: once
        async with watching(store, P + "a/") as events:
            revision = await store.apply(puts, deletes)
            kvs, _ = await store.get_prefix(P + "a/")
            seen = await _settled(store, events, P + "a/end")
        assert revision == before + 1
        assert kvs == [
            KeyValue(P + "a/b", b"3", revision),
            KeyValue(P + "a/kept", b"2", revision, lease),
            KeyValue(P + "a/z", b"1", revision),
        ]
        # One event per change, all at the transaction's revision, in the order given.
        assert _shape(seen) == [
            ("put", "a/z", b"1"),
            ("put", "a/kept", b"2"),
            ("put", "a/b", b"3"),
            ("delete", "a/gone", b""),
            ("delete", "a/also", b""),
        ]
        assert {event.revision for event in seen} == {revision}
        # A batch that changes nothing adds no revision and says the current one.
        now = revision + 1  # the marker's
        assert await store.apply([], [P + "a/missing", P + "none"]) == now
        assert await store.apply([]) == now
        assert (await store.get_prefix(P))[1] == now

    aio.run(main())


def test_apply_splits_a_large_batch_into_transactions(subject: Subject, aio: Aio) -> None:
    store = subject.store
    keys = [P + f"s/{i:03d}" for i in range(2 * MAX_TXN_OPS + 50)]

    async def main() -> None:
        before = await store.apply([Put(key, b"old") for key in keys[:100]])
        async with watching(store, P + "s/") as events:
            # 206 puts and 100 deletes: more than etcd takes in one txn.
            revision = await store.apply([Put(key, b"new") for key in keys[100:]], keys[:100])
            seen = await _settled(store, events, P + "s/end")
        assert revision == before + 3
        assert [e.revision for e in seen] == (
            [before + 1] * MAX_TXN_OPS + [before + 2] * MAX_TXN_OPS + [before + 3] * 50
        )
        assert _shape(seen) == [("put", key.removeprefix(P), b"new") for key in keys[100:]] + [
            ("delete", key.removeprefix(P), b"") for key in keys[:100]
        ]
        kvs, _ = await store.get_prefix(P + "s/")
        assert [kv.key for kv in kvs] == [*keys[100:], P + "s/end"]

    aio.run(main())


def test_apply_refuses_a_key_twice_or_empty_and_writes_nothing(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        before = await store.put(P + "k", b"0")
        bad: list[tuple[list[Put], list[str]]] = [
            ([Put(P + "t/a", b"1"), Put(P + "t/a", b"2")], []),
            ([Put(P + "t/a", b"1")], [P + "t/a"]),
            ([Put(P + f"t/{i}", b"1") for i in range(MAX_TXN_OPS)] + [Put(P + "t/0", b"2")], []),
        ]
        for puts, deletes in bad:
            with pytest.raises(StoreError, match="twice"):
                await store.apply(puts, deletes)
        with pytest.raises(StoreError, match="key is not provided"):
            await store.apply([Put(P + "t/a", b"1")], [""])
        assert await store.get_prefix(P) == ([KeyValue(P + "k", b"0", before)], before)

    aio.run(main())


def test_apply_puts_on_leases_that_expire_or_are_revoked(subject: Subject, aio: Aio) -> None:
    store = subject.store

    async def main() -> None:
        short = await store.grant_lease(1)
        long = await store.grant_lease(30)
        revision = await store.apply(
            [
                Put(P + "l/s1", b"1", short),
                Put(P + "l/s2", b"2", short),
                Put(P + "l/long", b"3", long),
                Put(P + "l/none", b"4"),
            ]
        )
        assert await store.get(P + "l/s1") == KeyValue(P + "l/s1", b"1", revision, short)
        async with watching(store, P + "l/") as events:
            await subject.pass_time(1.0)
            await _gone(store, P + "l/s1")
            await _gone(store, P + "l/s2")
            assert await store.get(P + "l/long") is not None
            await store.revoke_lease(long)
            assert await store.get(P + "l/long") is None
            seen = await _settled(store, events, P + "l/end")
        assert _shape(seen) == [
            ("delete", "l/s1", b""),
            ("delete", "l/s2", b""),
            ("delete", "l/long", b""),
        ]
        assert seen[0].revision == seen[1].revision < seen[2].revision
        assert await store.get(P + "l/none") is not None

    aio.run(main())


def test_apply_on_a_lease_that_is_gone_writes_nothing_of_its_txn(
    subject: Subject, aio: Aio
) -> None:
    store = subject.store

    async def main() -> None:
        gone = await store.grant_lease(30)
        await store.revoke_lease(gone)
        before = await store.put(P + "x/old", b"0")
        for lease in (gone, 0x5EED):  # revoked, never granted
            with pytest.raises(LeaseLost) as lost:
                await store.apply(
                    [Put(P + "x/a", b"1"), Put(P + "x/b", b"2", lease)], [P + "x/old"]
                )
            assert "\n" not in str(lost.value) and "lease" in str(lost.value)
        assert await store.get_prefix(P) == ([KeyValue(P + "x/old", b"0", before)], before)
        # Of a batch of several transactions, those before the failing one are written.
        live = await store.grant_lease(30)
        first = [Put(P + f"y/{i:03d}", b"1", live) for i in range(MAX_TXN_OPS)]
        with pytest.raises(LeaseLost):
            await store.apply([*first, Put(P + "y/late", b"2", gone), Put(P + "y/later", b"3")])
        kvs, revision = await store.get_prefix(P + "y/")
        assert [kv.key for kv in kvs] == [put.key for put in first]
        assert revision == before + 1

    aio.run(main())
