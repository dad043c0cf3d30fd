"""The `fenced` view on the memory store: acks on the member lease, coalesced, and the
fence that closes an item (a limiter admits nothing under it) while the store is away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import until
from vmbox.functions.fixedwindow import FixedWindow
from vmbox.group import Group
from vmbox.middlebox import StateItem, encode_int, parse_limit
from vmbox.packet import Packet, Verdict
from vmbox.state import keys
from vmbox.state.fence import parse_ack
from vmbox.state.memory import MemoryStore
from vmbox.state.views import FencedView, make_view

LIMIT = FixedWindow.state[0]
KEY = keys.state_key("t", "limit")
ACK = keys.fence_key("t", "limit", "r1")
TTL = 1  # a fence of 0.5 s


def _fenced(store: MemoryStore, changes: list[Any]) -> FencedView:
    view = make_view(
        "fenced", store, KEY, LIMIT, 100, on_change=changes.append, ttl=TTL, ack_key=ACK
    )
    assert isinstance(view, FencedView)
    return view


@contextlib.asynccontextmanager
async def running(view: FencedView) -> AsyncIterator[FencedView]:
    task = asyncio.create_task(view.run())
    try:
        yield view
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_only_items_with_a_closed_value_can_be_fenced() -> None:
    plain = StateItem("limit", "limit", parse_limit, encode_int)  # no closed value
    with pytest.raises(ValueError, match="cannot be fenced"):
        make_view("fenced", MemoryStore(), KEY, plain, 1, ack_key=ACK)
    assert LIMIT.closed == 0


def test_closed_until_registered_then_open_with_the_stored_value_and_acked() -> None:
    store, changes = MemoryStore(), list[Any]()

    async def main() -> None:
        written = await store.put(KEY, b"50")
        view = _fenced(store, changes)
        async with running(view):
            await until(lambda: view.reads > 0, 1)
            assert view.closed and changes == [0]  # no lease: admit nothing
            lease = await store.grant_lease(TTL)
            view.lease_of = lambda: lease
            await until(lambda: not view.closed, 1)
            assert changes == [0, 50] and view.enforced == 50
            await until(lambda: view.acks == 1, 1)
            ack = await store.get(ACK)
            assert ack is not None and ack.lease == lease and parse_ack(ack.value) == written

    asyncio.run(main())


def test_a_burst_of_writes_is_one_watch_event_each_and_fewer_acks() -> None:
    store, changes = MemoryStore(), list[Any]()

    async def main() -> None:
        await store.put(KEY, b"50")
        view = _fenced(store, changes)
        lease = await store.grant_lease(TTL)
        view.lease_of = lambda: lease
        async with running(view):
            await until(lambda: view.acks == 1, 1)
            last = 0
            for value in range(1, 51):
                last = await store.put(KEY, str(value).encode())
            await until(lambda: view.watch_revision == last, 1)

            async def acked() -> int | None:
                ack = await store.get(ACK)
                return None if ack is None else parse_ack(ack.value)

            deadline = time.monotonic() + 1
            while await acked() != last and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert await acked() == last and view.value == 50
            assert view.watch_events == 50
            print(f"50 writes: {view.watch_events} watch events, {view.acks} acks")
            assert 1 < view.acks <= view.watch_events + 1  # at most one per write; newest only

    asyncio.run(main())


def test_cut_off_longer_than_the_fence_admits_nothing_until_it_caught_up() -> None:
    store = MemoryStore()
    limiter = FixedWindow({"limit": 100, "window": 1.0}, Group(("r1",), "r1"))

    def to_limiter(value: Any) -> None:
        limiter.update(values={"limit": value})

    now = 5000.25  # one window throughout: what passed before the cut still counts

    def admitted(count: int) -> int:
        packets = (Packet("198.18.0.7", 4000 + i, 64) for i in range(count))
        return sum(limiter.process(p, now) is Verdict.PASS for p in packets)

    async def main() -> None:
        await store.put(KEY, b"100")
        view = make_view(
            "fenced", store, KEY, LIMIT, 100, on_change=to_limiter, ttl=TTL, ack_key=ACK
        )
        assert isinstance(view, FencedView)
        lease = await store.grant_lease(TTL)
        view.lease_of = lambda: lease
        async with running(view):
            await until(lambda: not view.closed, 1)
            assert admitted(5) == 5
            store.available = False
            cut = time.monotonic()
            await until(lambda: view.closed, 1)
            # Closed no later than the deadline after the cut (plus the probe interval
            # and the timer's lateness), and strictly before the lease could expire.
            closed_after = time.monotonic() - cut
            assert closed_after < view.fence.deadline + 0.2 < TTL
            assert limiter.limit == 0 and view.value == 100
            assert admitted(50) == 0
            await asyncio.sleep(view.fence.deadline)
            assert view.closed and admitted(50) == 0  # still cut off: still closed
            store.available = True
            # The lease expired meanwhile: the old one no longer confirms anything.
            await asyncio.sleep(0.1)
            assert view.closed and admitted(50) == 0
            new = await store.grant_lease(TTL)  # what membership's re-registration does
            await store.put(KEY, b"7")
            view.lease_of = lambda: new
            await until(lambda: not view.closed, 1)
            assert limiter.limit == 7 and view.closings == 1
            assert admitted(50) == 2  # 5 + 2 = 7 in this window, nothing under 100

    asyncio.run(main())


def test_a_new_lease_closes_the_item_until_a_probe_on_it_succeeds() -> None:
    store, changes = MemoryStore(), list[Any]()

    async def main() -> None:
        await store.put(KEY, b"50")
        view = _fenced(store, changes)
        first = await store.grant_lease(TTL)
        view.lease_of = lambda: first
        async with running(view):
            await until(lambda: not view.closed, 1)
            second = await store.grant_lease(TTL)
            store.available = False  # the probe on the new lease cannot succeed
            view.lease_of = lambda: second
            await until(lambda: view.closed, 1)
            store.available = True
            await until(lambda: not view.closed, 1)
            assert view.fence.lease == second
            await until(lambda: view.acks == 2, 1)  # the ack moved to the new lease
            ack = await store.get(ACK)
            assert ack is not None and ack.lease == second

    asyncio.run(main())


def test_a_limit_may_be_zero_and_a_zero_limit_admits_nothing() -> None:
    from vmbox.functions.tokenbucket import TokenBucket
    from vmbox.middlebox import StateValueError

    assert [parse_limit(raw) for raw in (b"0", b"+0", b"00", b" 7\n")] == [0, 0, 0, 7]
    for raw in (b"-0", b"abc", b"", b"-5"):
        with pytest.raises(StateValueError):
            parse_limit(raw)
    bucket = TokenBucket({"limit": 100, "burst": 500, "window": 1.0}, Group(("r1",), "r1"))
    now = 100.0
    assert bucket.process(Packet("198.18.0.7", 1, 64), now) is Verdict.PASS
    bucket.update(values={"limit": 0})  # the burst must not let anything through either
    verdicts = {bucket.process(Packet("198.18.0.7", 1, 64), now + i / 10) for i in range(30)}
    assert verdicts == {Verdict.DROP}
