"""Consistency-mode views against a real etcd, with values written by the real etcdctl."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import Aio, until
from vmbox.etcdserver import EtcdServer
from vmbox.middlebox import StateItem, encode_int, parse_positive_int
from vmbox.state import keys
from vmbox.state.etcd import EtcdStore, connect
from vmbox.state.views import PollView, StrongView, View, WatchView, make_view

pytestmark = pytest.mark.timeout(60)

LIMIT = StateItem("limit", "limit", parse_positive_int, encode_int)
KEY = keys.state_key("t", "limit")  # /vmbox/t/state/limit
Etcdctl = Callable[..., Awaitable[str]]


@contextlib.asynccontextmanager
async def running(view: View) -> AsyncIterator[View]:
    """Run a view until its first read is done; cancel it on exit."""
    task = asyncio.create_task(view.run())
    try:
        await until(lambda: view.reads > 0, 5)
        yield view
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_watch_view_sees_an_etcdctl_put_within_200ms(
    store: EtcdStore, aio: Aio, etcd: EtcdServer, etcdctl: Etcdctl
) -> None:
    async def main() -> None:
        changes: list[Any] = []
        view = make_view("watch", store, KEY, LIMIT, 100, on_change=changes.append)
        assert isinstance(view, WatchView)
        async with running(view):
            assert view.value == 100 and not view.stale
            await etcdctl(etcd.endpoints, "put", KEY, "50")
            took = await until(lambda: view.value == 50, 2)
        assert took < 0.2, f"watch took {took * 1000:.0f} ms"
        assert changes == [50] and view.updates == 1

    aio.run(main())


def test_poll_view_sees_a_put_within_interval_plus_one_read(
    store: EtcdStore, aio: Aio, etcd: EtcdServer, etcdctl: Etcdctl
) -> None:
    async def main() -> None:
        view = make_view("poll", store, KEY, LIMIT, 100, poll_interval=0.2)
        assert isinstance(view, PollView)
        async with running(view):
            await etcdctl(etcd.endpoints, "put", KEY, "50")
            took = await until(lambda: view.value == 50, 2)
        assert took < 0.2 + 0.1, f"poll took {took * 1000:.0f} ms"

    aio.run(main())


def test_strong_view_read_returns_the_new_value_at_once(
    store: EtcdStore, aio: Aio, etcd: EtcdServer, etcdctl: Etcdctl
) -> None:
    async def main() -> None:
        await store.put(KEY, b"70")
        view = make_view("strong", store, KEY, LIMIT, 100)
        assert isinstance(view, StrongView)
        async with running(view):
            assert view.value == 70  # the initial read of run()
            await etcdctl(etcd.endpoints, "put", KEY, "50")
            assert await view.read() == 50

    aio.run(main())


def test_local_view_ignores_the_store(store: EtcdStore, aio: Aio) -> None:
    async def main() -> None:
        await store.put(KEY, b"50")
        view = make_view("local", store, KEY, LIMIT, 100)
        await asyncio.wait_for(view.run(), 1)
        assert view.value == 100

    aio.run(main())


def test_garbage_keeps_the_last_good_value(
    store: EtcdStore, aio: Aio, etcd: EtcdServer, etcdctl: Etcdctl
) -> None:
    async def main() -> None:
        view = make_view("watch", store, KEY, LIMIT, 100)
        async with running(view):
            await etcdctl(etcd.endpoints, "put", KEY, "50")
            await until(lambda: view.value == 50, 2)
            await etcdctl(etcd.endpoints, "put", KEY, "abc")
            await until(lambda: view.bad_values == 1, 2)
            assert view.value == 50 and view.last_error is not None
            assert "abc" in view.last_error
            await etcdctl(etcd.endpoints, "put", KEY, "60")
            await until(lambda: view.value == 60, 2)
            assert view.last_error is None and view.bad_values == 1

    aio.run(main())


@pytest.mark.parametrize("mode", ["watch", "poll", "strong"])
def test_fail_static_while_etcd_is_away(own_etcd: EtcdServer, aio: Aio, mode: str) -> None:
    async def main() -> None:
        store = await connect(own_etcd.endpoints)
        await store.put(KEY, b"50")
        view = make_view(mode, store, KEY, LIMIT, 100, poll_interval=0.1)
        if isinstance(view, WatchView):
            view.probe_interval = 0.2
        async with running(view):
            assert view.value == 50
            await asyncio.to_thread(own_etcd.stop_member, 0)
            if isinstance(view, StrongView):
                assert await asyncio.wait_for(view.read(), 3) == 50
                assert await asyncio.wait_for(view.read(), 0.1) == 50  # no wait once stale
            await until(lambda: view.stale, 5)
            assert view.value == 50 and view.last_error
            await asyncio.to_thread(own_etcd.restart)
            await until(lambda: not view.stale, 8)
            await store.put(KEY, b"40")
            if isinstance(view, StrongView):
                assert await view.read() == 40
            await until(lambda: view.value == 40, 5)
        await store.close()

    aio.run(main())
