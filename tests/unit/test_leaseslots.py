"""Lease slots: a deadline's slot and TTL (pure), and the driver on the memory store's clock."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random

import pytest

from vmbox.state.leaseslots import LeaseSlots, Slot, slot_for
from vmbox.state.memory import FakeClock, MemoryStore
from vmbox.state.store import LeaseLost, StoreUnavailable

T0 = 1_700_000_000.0  # epoch seconds, as the callers' deadlines are


def test_a_deadline_rounds_up_to_the_next_multiple_of_the_granularity() -> None:
    assert slot_for(T0 + 10, T0, 5) == Slot(340_000_002, T0 + 10, 10)  # on a multiple: itself
    assert slot_for(T0 + 10.001, T0, 5) == Slot(340_000_003, T0 + 15, 15)
    assert slot_for(T0 + 14.999, T0 + 0.5, 5) == Slot(340_000_003, T0 + 15, 15)  # ceil(14.5)
    assert slot_for(T0 + 1.2, T0 + 1, 1).ttl == 1  # ends in 0.8 s: a whole second


def test_a_deadline_already_past_counts_as_now() -> None:
    assert slot_for(T0 - 100, T0 + 0.5, 10) == Slot(170_000_001, T0 + 10, 10)
    # On the end itself: a slot that ends now still gets a lease of a second.
    assert slot_for(T0 - 3, T0, 10) == Slot(170_000_000, T0, 1)


def test_a_granularity_must_be_positive() -> None:
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="positive"):
            slot_for(T0, T0, bad)
        with pytest.raises(ValueError, match="positive"):
            LeaseSlots(MemoryStore(), bad)


def test_an_entry_lives_from_its_deadline_to_at_most_a_slot_and_a_second_more() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        granularity = rng.choice([0.1, 0.25, 1, 2.5, 5, 30, 60])
        now = T0 + rng.uniform(0, 1000)
        deadline = now + rng.uniform(-5, 600)
        slot = slot_for(deadline, now, granularity)
        due = max(deadline, now)
        assert slot.end == slot.index * granularity
        assert due <= slot.end < due + granularity + 1e-6
        expires = now + slot.ttl  # granted at `now` at the earliest
        assert slot.end <= expires <= slot.end + 1
        assert expires <= due + granularity + 1 + 1e-6
        assert slot.ttl >= 1


def _at(store: MemoryStore, clock: FakeClock, when: float) -> None:
    """Set the clock to `when` (epoch seconds) and expire what is due by then."""
    assert when >= clock.now
    clock.now = when
    store.expire()


def _slots(granularity: float = 10) -> tuple[FakeClock, MemoryStore, LeaseSlots]:
    clock = FakeClock(T0)
    store = MemoryStore(clock=clock)
    return clock, store, LeaseSlots(store, granularity)


def test_deadlines_of_one_slot_share_one_lease_that_expires_at_its_end() -> None:
    clock, store, slots = _slots(10)

    async def main() -> None:
        first = await slots.lease_for(T0 + 11, clock())
        assert await slots.lease_for(T0 + 20, clock()) == first
        clock.advance(3)
        assert await slots.lease_for(T0 + 15, clock()) == first  # cached, no grant
        other = await slots.lease_for(T0 + 20.5, clock())
        assert other != first and slots.grants == 2 and len(slots) == 2
        await store.put("/k/first", b"1", lease=first)
        await store.put("/k/other", b"2", lease=other)
        _at(store, clock, T0 + 19.999)
        assert await store.get("/k/first") is not None  # its deadline T0 + 20 is not past
        _at(store, clock, T0 + 20)  # granted at T0 with TTL 20
        assert await store.get("/k/first") is None
        _at(store, clock, T0 + 29.999)
        assert await store.get("/k/other") is not None
        _at(store, clock, T0 + 30)  # the other slot's end (granted at T0 + 3, TTL 27)
        assert await store.get("/k/other") is None

    asyncio.run(main())


def test_a_lease_granted_mid_slot_ends_less_than_a_second_after_the_slot() -> None:
    clock, store, slots = _slots(10)

    async def main() -> None:
        clock.advance(2.5)
        lease = await slots.lease_for(T0 + 7, clock())  # slot end T0 + 10: TTL ceil(7.5) = 8
        await store.put("/k", b"1", lease=lease)
        _at(store, clock, T0 + 10.499)
        assert await store.get("/k") is not None
        _at(store, clock, T0 + 10.5)  # deadline + 3.5 s < deadline + G + 1 s
        assert await store.get("/k") is None

    asyncio.run(main())


def test_concurrent_callers_of_one_slot_share_one_grant() -> None:
    clock, _, slots = _slots(5)

    async def main() -> None:
        leases = await asyncio.gather(
            *(slots.lease_for(T0 + 1 + i / 10, clock()) for i in range(40))
        )
        assert len(set(leases)) == 1 and slots.grants == 1
        # A caller cancelled while the grant is under way leaves it to the others.
        first = asyncio.create_task(slots.lease_for(T0 + 7, clock()))
        await asyncio.sleep(0)  # the grant has started
        second = asyncio.create_task(slots.lease_for(T0 + 8, clock()))
        first.cancel()
        assert await second not in leases and slots.grants == 2
        with contextlib.suppress(asyncio.CancelledError):
            await first

    asyncio.run(main())


def test_slots_that_ended_are_forgotten_so_at_most_the_horizon_is_held() -> None:
    clock, _, slots = _slots(10)

    async def main() -> None:
        for _ in range(600):  # a deadline 60 s ahead every 0.5 s, for 5 minutes
            await slots.lease_for(clock() + 60, clock())
            assert len(slots) <= 60 / 10 + 1
            clock.advance(0.5)
        assert slots.grants == 31  # one per slot end met: T0 + 60, T0 + 70 ... T0 + 360
        clock.advance(61)  # past every slot held
        await slots.lease_for(clock() + 1, clock())
        assert len(slots) == 1

    asyncio.run(main())


def test_a_forgotten_lease_is_granted_anew() -> None:
    clock, store, slots = _slots(10)

    async def main() -> None:
        lease = await slots.lease_for(T0 + 5, clock())
        await store.revoke_lease(lease)  # say, an operator with etcdctl
        with pytest.raises(LeaseLost):
            await store.put("/k", b"1", lease=lease)
        slots.forget(lease)
        slots.forget(0x5EED)  # unknown: nothing
        slots.forget(0)  # no lease: nothing
        again = await slots.lease_for(T0 + 5, clock())
        assert again != lease and slots.grants == 2
        await store.put("/k", b"1", lease=again)

    asyncio.run(main())


def test_a_failed_grant_is_not_cached() -> None:
    clock, store, slots = _slots(10)

    async def main() -> None:
        store.available = False
        waiters = [slots.lease_for(T0 + 5, clock()) for _ in range(3)]
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes)
        assert len(slots) == 0 and slots.grants == 0
        store.available = True
        assert await slots.lease_for(T0 + 5, clock()) and slots.grants == 1

    asyncio.run(main())


def test_close_cancels_grants_under_way_and_revokes_nothing() -> None:
    clock, store, slots = _slots(10)

    async def main() -> None:
        lease = await slots.lease_for(T0 + 5, clock())
        await store.put("/k", b"1", lease=lease)
        pending = asyncio.create_task(slots.lease_for(T0 + 50, clock()))
        await asyncio.sleep(0)
        await slots.close()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert len(slots) == 0
        assert await store.get("/k") is not None  # it expires at its slot's end, not now

    asyncio.run(main())


def test_a_grant_that_fails_with_every_caller_gone_logs_no_unseen_error() -> None:
    clock, store, slots = _slots(10)
    unseen: list[dict[str, object]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unseen.append(context))
        store.available = False
        caller = asyncio.create_task(slots.lease_for(T0 + 5, clock()))
        await asyncio.sleep(0)  # the grant has started
        caller.cancel()
        for _ in range(5):
            await asyncio.sleep(0)  # the grant fails meanwhile
        assert len(slots) == 0
        del caller
        gc.collect()  # an error nobody saw is reported when its task is collected

    asyncio.run(main())
    gc.collect()
    assert unseen == []
