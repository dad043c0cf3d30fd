"""EtcdStore against a real etcd: reads, writes, CAS, leases, watches, outages, failover."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import Aio, retry, until
from vmbox.etcdserver import EtcdCluster, EtcdServer, free_port
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.store import LeaseLost, StoreUnavailable, WatchEvent

pytestmark = pytest.mark.timeout(60)


def test_put_get_delete_and_prefixes(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        rev = await store.put("/vmbox/t/a", b"1")
        got = await store.get("/vmbox/t/a")
        assert got is not None and got.value == b"1" and got.mod_revision == rev
        await store.put("/vmbox/t/b", b"2")
        await store.put("/vmbox/u/c", b"3")
        kvs, revision = await store.get_prefix("/vmbox/t/")
        assert [kv.key for kv in kvs] == ["/vmbox/t/a", "/vmbox/t/b"] and revision > rev
        assert await store.delete("/vmbox/t/a") is True
        assert await store.delete("/vmbox/t/a") is False
        assert await store.get("/vmbox/t/a") is None
        assert await store.delete_prefix("/vmbox/t/") == 1
        assert await store.delete_prefix("/vmbox/u/") == 1

    aio.run(main())


def test_compare_and_swap(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        assert await store.compare_and_swap("/vmbox/t/x", None, b"1")
        assert not await store.compare_and_swap("/vmbox/t/x", None, b"2")
        assert not await store.compare_and_swap("/vmbox/t/x", b"0", b"2")
        assert await store.compare_and_swap("/vmbox/t/x", b"1", b"2")
        got = await store.get("/vmbox/t/x")
        assert got is not None and got.value == b"2"

    aio.run(main())


def test_lease_expiry_removes_the_key(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        lease = await store.grant_lease(1)
        await store.put("/vmbox/t/m", b"x", lease=lease)
        got = await store.get("/vmbox/t/m")
        assert got is not None and got.lease == lease
        assert await store.refresh_lease(lease) >= 1
        deadline = time.monotonic() + 5
        while await store.get("/vmbox/t/m") is not None:
            assert time.monotonic() < deadline, "leased key outlived its TTL"
            await asyncio.sleep(0.1)
        with pytest.raises(LeaseLost):
            await store.refresh_lease(lease)
        with pytest.raises(LeaseLost):
            await store.put("/vmbox/t/m", b"y", lease=lease)

    aio.run(main())


def test_revoke_removes_at_once(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        lease = await store.grant_lease(30)
        await store.put("/vmbox/t/m", b"x", lease=lease)
        await store.revoke_lease(lease)
        assert await store.get("/vmbox/t/m") is None
        await store.revoke_lease(lease)  # twice is fine

    aio.run(main())


def test_watch_sees_puts_and_deletes_in_order(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        first = await store.put("/vmbox/t/a", b"1")  # before the watch: replayed from revision
        await store.put("/vmbox/other", b"no")
        events: list[WatchEvent] = []

        async def follow() -> None:
            async for event in store.watch_prefix("/vmbox/t/", first):
                events.append(event)

        task = asyncio.create_task(follow())
        await store.put("/vmbox/t/b", b"2")
        await store.delete("/vmbox/t/a")
        await until(lambda: len(events) == 3, 5)
        task.cancel()
        assert [(e.kind, e.key, e.value) for e in events] == [
            ("put", "/vmbox/t/a", b"1"),
            ("put", "/vmbox/t/b", b"2"),
            ("delete", "/vmbox/t/a", b""),
        ]

    aio.run(main())


def test_watch_resumes_across_an_etcd_restart(own_etcd: EtcdServer, aio: Aio) -> None:
    async def main() -> None:
        store = await connect(own_etcd.endpoints)
        events: list[bytes] = []

        async def follow() -> None:
            async for event in store.watch_prefix("/vmbox/t/"):
                events.append(event.value)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.2)
        await store.put("/vmbox/t/k", b"before")
        await until(lambda: events == [b"before"], 5)
        await asyncio.to_thread(own_etcd.stop_member, 0)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_etcd.restart)
        # Written before the watch stream is back: resuming at the last revision + 1 finds it.
        writer = await connect(own_etcd.endpoints)
        await writer.put("/vmbox/t/k", b"during")
        await store.put("/vmbox/t/k", b"after")
        await until(lambda: len(events) == 3, 10)
        assert events == [b"before", b"during", b"after"]
        task.cancel()
        await writer.close()
        await store.close()

    aio.run(main())


def test_calls_fail_fast_when_etcd_is_gone(own_etcd: EtcdServer, aio: Aio) -> None:
    # A refused connection is an answer: each call must say so at once, not wait
    # out its timeout. The timeout is made far longer than the bound, so a call
    # that waited for etcd (the bound's 2 s only catch a stall) cannot pass.
    op_timeout, bound = 10.0, 2.0

    async def main() -> None:
        store = await connect(own_etcd.endpoints, op_timeout=op_timeout)
        await asyncio.to_thread(own_etcd.kill_member, 0)
        elapsed = []
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=own_etcd.endpoint):
            await store.get("/vmbox/t/a")
        elapsed.append(time.monotonic() - start)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.put("/vmbox/t/a", b"1")
        elapsed.append(time.monotonic() - start)
        print(f"calls failed after {elapsed} s")
        assert max(elapsed) < bound, elapsed
        await asyncio.to_thread(own_etcd.restart)
        await retry(lambda: store.put("/vmbox/t/a", b"1"))
        await store.close()

    aio.run(main())


def test_connect_to_nothing_fails_within_the_timeout(aio: Aio) -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        aio.run(connect([f"http://127.0.0.1:{port}"], timeout=1.0))
    assert time.monotonic() - start < 3
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "connection refused" in message
    assert "\n" not in message


def test_cluster_survives_losing_its_leader(etcd_cluster: EtcdCluster, aio: Aio) -> None:
    async def main() -> None:
        store = await connect(etcd_cluster.endpoints)
        await store.put("/vmbox/t/c", b"1")
        leader = etcd_cluster.leader_index()
        assert leader is not None
        await asyncio.to_thread(etcd_cluster.kill_member, leader)
        try:
            # A write may fail while the others elect a new leader; then it must succeed.
            await retry(lambda: store.put("/vmbox/t/c", b"2"), within=10)
            got = await store.get("/vmbox/t/c")
            assert got is not None and got.value == b"2"
        finally:
            await asyncio.to_thread(etcd_cluster.start_member, leader)
            await store.delete_prefix("/vmbox/")
            await store.close()

    aio.run(main())


def test_blocking_keep_alives_share_one_stream_and_survive_a_restart(
    own_etcd: EtcdServer, aio: Aio
) -> None:
    """The fenced probe's keep-alive off the loop: many on one stream, each moving the
    lease's deadline; an etcd that went away is a one-line StoreUnavailable, and the next
    keep-alive after its return opens a new stream; a gone lease is LeaseLost."""

    async def main() -> None:
        store = await connect(own_etcd.endpoints, op_timeout=5.0)
        lease = await store.grant_lease(2)
        await store.put("/vmbox/t/k", b"x", lease=lease)
        for _ in range(12):  # 3 s: twice the TTL, held by these keep-alives alone
            assert await asyncio.to_thread(store.blocking_refresh_lease, lease, timeout=2.0) == 2
            await asyncio.sleep(0.25)
        assert await store.get("/vmbox/t/k") is not None
        blocking = store._blocking
        assert blocking is not None
        stream = blocking._keeping
        await asyncio.to_thread(store.blocking_refresh_lease, lease, timeout=2.0)
        assert blocking._keeping is stream  # one stream for all of them
        await asyncio.to_thread(own_etcd.kill_member, 0)
        with pytest.raises(StoreUnavailable):
            await asyncio.to_thread(store.blocking_refresh_lease, lease, timeout=1.0)
        await asyncio.to_thread(own_etcd.restart)
        ttl = await retry(
            lambda: asyncio.to_thread(store.blocking_refresh_lease, lease, timeout=2.0)
        )
        assert ttl >= 1 and blocking._keeping is not stream
        await store.revoke_lease(lease)
        with pytest.raises(LeaseLost):
            await asyncio.to_thread(store.blocking_refresh_lease, lease, timeout=2.0)
        await store.close()

    aio.run(main())
