"""Membership against a real etcd: registration, leave, expiry, revoke, watch, outages."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest

from tests.conftest import Aio, until
from vmbox.etcdserver import EtcdServer
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.membership import MemberInfo, Membership, list_members, watch_members

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def running(member: Membership) -> AsyncIterator[asyncio.Task[None]]:
    """Run a membership; on exit cancel it without leaving (as a crashed replica would)."""
    task = asyncio.create_task(member.run())
    try:
        await asyncio.wait_for(member.registered.wait(), 5)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _members(store: EtcdStore) -> dict[str, MemberInfo]:
    return await list_members(store, "t")


def test_two_members_are_listed_and_leave_removes_at_once(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        one = Membership(store, "t", "r1", {"pid": 1, "metrics": "127.0.0.1:9001"})
        two = Membership(store, "t", "r2", {"pid": 2})
        async with running(one), running(two) as task_two:
            members = await _members(store)
            assert sorted(members) == ["r1", "r2"]
            assert members["r1"].info == {"pid": 1, "metrics": "127.0.0.1:9001"}
            assert members["r1"].lease == one.lease != 0
            await two.leave()
            assert sorted(await _members(store)) == ["r1"]
            await asyncio.wait_for(task_two, 2)  # run() returns after leave()

    aio.run(main())


def test_a_forgotten_member_disappears_within_its_ttl(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        async with running(Membership(store, "t", "gone", {}, ttl=1)):
            assert "gone" in await _members(store)
        # Cancelled without leave(): nobody refreshes the lease any more.
        start = time.monotonic()
        while "gone" in await _members(store):
            assert time.monotonic() - start < 3, "member outlived its 1 s lease"
            await asyncio.sleep(0.1)

    aio.run(main())


def test_set_info_rewrites_on_the_same_lease(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        member = Membership(store, "t", "r1", {"pid": 1})
        async with running(member):
            lease = member.lease
            await member.set_info({"pid": 1, "metrics": "x"})
            got = (await _members(store))["r1"]
            assert got.info == {"pid": 1, "metrics": "x"} and got.lease == lease

    aio.run(main())


def test_a_revoked_member_registers_again(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        member = Membership(store, "t", "r1", {"pid": 1}, ttl=1)
        async with running(member):
            old = member.lease
            await store.revoke_lease(old)  # what the controller does to a dead replica
            assert "r1" not in await _members(store)
            await until(lambda: member.registrations == 2, 5)
            again = (await _members(store))["r1"]
            assert again.lease != old and again.info == {"pid": 1}

    aio.run(main())


def test_watch_members_yields_a_snapshot_per_change(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        snapshots: list[list[str]] = []

        async def follow() -> None:
            async for snapshot in watch_members(store, "t"):
                snapshots.append(sorted(snapshot))

        task = asyncio.create_task(follow())
        await until(lambda: snapshots == [[]], 5)
        member = Membership(store, "t", "r1", {})
        async with running(member):
            await until(lambda: snapshots[-1] == ["r1"], 5)
            await member.leave()
            await until(lambda: snapshots[-1] == [], 5)
        task.cancel()
        assert snapshots == [[], ["r1"], []]

    aio.run(main())


def test_membership_survives_an_etcd_restart(own_etcd: EtcdServer, aio: Aio) -> None:
    async def main() -> None:
        store = await connect(own_etcd.endpoints)
        member = Membership(store, "t", "r1", {"pid": 7}, ttl=1)
        snapshots: list[list[str]] = []

        async def follow() -> None:
            async for snapshot in watch_members(store, "t"):
                snapshots.append(sorted(snapshot))

        watcher = asyncio.create_task(follow())
        async with running(member) as task:
            await asyncio.to_thread(own_etcd.kill_member, 0)
            await asyncio.sleep(1.5)  # longer than the TTL: run() must keep trying, not crash
            assert not task.done()
            await asyncio.to_thread(own_etcd.restart)
            await until(lambda: member.last_error is None, 15)
            await until(lambda: bool(snapshots) and snapshots[-1] == ["r1"], 15)
            assert "r1" in await list_members(store, "t"), (member.last_error, snapshots)
        watcher.cancel()
        await store.close()

    aio.run(main())


_CHILD = """
import asyncio, sys
from vmbox.state.etcd import connect
from vmbox.state.membership import Membership

async def main():
    store = await connect(sys.argv[1].split(","))
    member = Membership(store, "t", "child", {"pid": 0}, ttl=1)
    task = asyncio.create_task(member.run())
    await member.registered.wait()
    print("registered", flush=True)
    await task

asyncio.run(main())
"""


def test_a_sigkilled_replica_disappears_within_its_ttl(
    store: EtcdStore, aio: Aio, etcd: EtcdServer
) -> None:
    async def main() -> None:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            ",".join(etcd.endpoints),
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        assert (await asyncio.wait_for(child.stdout.readline(), 10)).strip() == b"registered"
        assert "child" in await _members(store)
        child.send_signal(signal.SIGKILL)
        await child.wait()
        start = time.monotonic()
        while "child" in await _members(store):
            assert time.monotonic() - start < 3, "a killed replica outlived its 1 s lease"
            await asyncio.sleep(0.1)

    aio.run(main())
