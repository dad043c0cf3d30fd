"""The views: applying stored values, bad values, staleness flags, and each
consistency mode running on the memory store (tests/integration/test_views.py
runs them on etcd)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import until
from vmbox.middlebox import StateItem, encode_int, parse_positive_int
from vmbox.state.memory import MemoryStore
from vmbox.state.store import StoreUnavailable
from vmbox.state.views import LocalView, PollView, StrongView, View, WatchView, make_view

LIMIT = StateItem("limit", "limit", parse_positive_int, encode_int)
KEY = "/vmbox/t/state/limit"


def _view(changes: list[Any]) -> View:
    return View(None, "/vmbox/t/state/limit", LIMIT, 100, on_change=changes.append)


def test_apply_parses_and_reports_changes_only() -> None:
    changes: list[Any] = []
    view = _view(changes)
    view.apply(b"50", 5)
    view.apply(b"50", 6)
    assert view.value == 50 and changes == [50] and view.updates == 1


def test_older_revisions_cannot_undo_newer_ones() -> None:
    view = _view([])
    view.apply(b"50", 7)
    view.apply(b"40", 6)
    assert view.value == 50


def test_garbage_is_counted_once_and_the_last_good_value_kept() -> None:
    view = _view([])
    view.apply(b"50", 2)
    view.apply(b"abc", 3)
    view.apply(b"abc", 3)  # the same stored value seen again by another read
    assert view.value == 50 and view.bad_values == 1
    assert view.last_error is not None and "abc" in view.last_error
    view.apply(b"-1", 4)
    assert view.bad_values == 2 and view.value == 50
    view.apply(b"60", 5)
    assert view.value == 60 and view.last_error is None


def test_stale_and_fresh_flags() -> None:
    view = _view([])
    view.mark_stale(StoreUnavailable("etcd at x unavailable"))
    assert view.stale and view.last_error == "etcd at x unavailable"
    view.mark_fresh()
    assert not view.stale and view.last_error is None


@pytest.mark.parametrize(
    ("mode", "cls"),
    [("local", LocalView), ("poll", PollView), ("watch", WatchView), ("strong", StrongView)],
)
def test_make_view_maps_modes(mode: str, cls: type[View]) -> None:
    view = make_view(mode, MemoryStore(), "/k", LIMIT, 1, poll_interval=0.5)
    assert type(view) is cls and view.mode == mode


def test_make_view_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="unknown consistency mode"):
        make_view("eventual", MemoryStore(), "/k", LIMIT, 1)


@contextlib.asynccontextmanager
async def running(view: View) -> AsyncIterator[View]:
    """Run a view until its first read is done; cancel it on exit."""
    task = asyncio.create_task(view.run())
    try:
        await until(lambda: view.reads > 0 or task.done(), 1)
        yield view
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _fast(mode: str, store: MemoryStore, changes: list[Any]) -> View:
    view = make_view(mode, store, KEY, LIMIT, 100, poll_interval=0.01, on_change=changes.append)
    if isinstance(view, WatchView):
        view.probe_interval = 0.01
    return view


@pytest.mark.parametrize("mode", ["poll", "watch", "strong"])
def test_shared_modes_follow_the_store_and_keep_the_last_good_value(mode: str) -> None:
    store, changes = MemoryStore(), list[Any]()

    async def main() -> None:
        await store.put(KEY, b"50")
        view = _fast(mode, store, changes)
        async with running(view):
            assert view.value == 50 and not view.stale
            steps = ((b"40", 40, 0), (b"abc", 40, 1), (b"0", 40, 2), (b"30", 30, 2))
            for raw, value, bad in steps:
                await store.put(KEY, raw)
                if isinstance(view, StrongView):
                    assert await view.read() == value  # one read, no waiting
                await until(lambda: view.bad_values == bad, 1)  # noqa: B023
                await until(lambda: view.value == value, 1)  # noqa: B023
            await store.delete(KEY)  # the controller seeds items, never unsets them
            reads = view.reads
            if isinstance(view, StrongView):
                await view.read()
            await until(lambda: view.reads > reads, 1)  # a read that found no key
            assert view.value == 30
        assert changes == [50, 40, 30] and view.bad_values == 2 and view.last_error is None

    asyncio.run(main())


def test_a_watch_view_counts_what_its_stream_delivered() -> None:
    store = MemoryStore()

    async def main() -> None:
        view = _fast("watch", store, [])
        assert isinstance(view, WatchView)
        async with running(view):
            assert view.value == 100  # no key yet: the configured value
            await store.put("/vmbox/t/state/limit2", b"7")  # under the key as a prefix: not it
            last = await store.put(KEY, b"60")
            await until(lambda: view.watch_revision == last, 1)
            assert view.value == 60 and view.watch_events == 1 and view.watch_reopens == 0

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["poll", "watch", "strong"])
def test_shared_modes_fail_static_while_the_store_is_away(mode: str) -> None:
    store = MemoryStore()

    async def main() -> None:
        await store.put(KEY, b"50")
        view = _fast(mode, store, [])
        async with running(view):
            store.available = False
            if isinstance(view, StrongView):
                assert await view.read() == 50  # the last value, at once
                assert view.stale
            await until(lambda: view.stale, 1)
            assert view.value == 50 and view.last_error is not None
            assert "unavailable" in view.last_error
            store.available = True
            await until(lambda: not view.stale, 1)
            await store.put(KEY, b"40")
            if isinstance(view, StrongView):
                assert await view.read() == 40
            await until(lambda: view.value == 40, 1)

    asyncio.run(main())


def test_a_local_view_never_reads_the_store() -> None:
    store = MemoryStore()

    async def main() -> None:
        await store.put(KEY, b"50")
        view = _fast("local", store, [])
        await asyncio.wait_for(view.run(), 1)  # returns at once
        assert view.value == 100 and view.reads == 0

    asyncio.run(main())
