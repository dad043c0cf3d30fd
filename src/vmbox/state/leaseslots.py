"""Lease slots: keyed entries that vanish from etcd by themselves at a deadline.

A stateful middlebox keeps one small entry per connection under
/vmbox/<service>/keyed/<table>/<key>, written behind the packet path in
batches (Store.apply). Each must leave etcd at (or a little after) its deadline
even if every replica dies, so that etcd never fills up: the entry rides on a
lease nobody keeps alive. A lease per entry would cost a grant (a raft write)
per connection and as many leases, which etcd revokes at most 1,000 a second;
so deadlines are rounded up to slots, the multiples of a granularity G, and
the entries of one slot share one lease that expires at the slot's end.

`slot_for` is the pure part (which slot, what TTL); `LeaseSlots` the driver
(one grant per slot, lazily, shared by concurrent callers, cached until the
slot's end). Granted at `now` (read before the grant) with TTL
ceil(end - now), a slot's lease expires at its grant plus the TTL, so an entry
put on it leaves etcd

- no earlier than its deadline: the grant reaches etcd after `now`, and
  end >= deadline;
- no later than deadline + G + 1 s: end < deadline + G, and the TTL rounds up
  by less than a second. Add the grant's own latency and etcd's lateness (its
  lessor looks for expired leases every 500 ms).

Where etcd stretches that: it raises a TTL under its minimum, ceil(1.5 x
--election-timeout) seconds (2 s at etcd's default 1 s, 1 s for vmbox's
private etcds at 500 ms), so an entry due sooner lives that long from its
grant; and a leader change (or a lone member's restart) restarts every lease
at its full TTL unless lease checkpointing is on
(--experimental-enable-lease-checkpoint), so each one can add up to the TTL.
The entries still expire: etcd cannot fill up.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from dataclasses import dataclass

from vmbox.state.store import Store


@dataclass(frozen=True, slots=True)
class Slot:
    """The slot `index` ends at index x granularity; a lease granted now lives `ttl` s."""

    index: int
    end: float
    ttl: int


def slot_for(deadline: float, now: float, granularity: float) -> Slot:
    """The slot of `deadline` (epoch seconds) and its lease's TTL if granted at `now`.

    The slot ends at the smallest multiple of `granularity` at or after the
    deadline. A deadline already past counts as `now` (a late write gets a
    short life, never a slot that has ended). The TTL is ceil(end - now), at
    least 1 s (etcd would raise a 0 to its minimum; the memory store would
    end it at once).
    """
    if not granularity > 0:
        raise ValueError(f"a slot granularity must be positive, not {granularity}")
    due = max(deadline, now)
    index = math.ceil(due / granularity)
    if index * granularity < due:  # the division rounded down by an ulp
        index += 1
    end = index * granularity
    return Slot(index, end, max(1, math.ceil(end - now)))


@dataclass(slots=True)
class _Held:
    """A slot's lease: 0 while its grant is under way (`grant`, awaited by all callers)."""

    grant: asyncio.Task[int] | None = None
    lease: int = 0


class LeaseSlots:
    """One unrenewed lease per slot of `granularity` s, granted at first use.

    Nothing here keeps a lease alive or revokes one: each expires at its
    slot's end, with the entries on it, whatever becomes of this process.
    Slots whose end has passed are forgotten at the next call, so at most
    (latest deadline - now) / granularity + 1 are held.
    """

    def __init__(self, store: Store, granularity: float) -> None:
        if not granularity > 0:
            raise ValueError(f"a slot granularity must be positive, not {granularity}")
        self.store = store
        self.granularity = granularity
        self.grants = 0  # leases granted, for metrics and tests
        self._slots: dict[int, _Held] = {}
        self._ends: list[int] = []  # a heap of the held slots' indexes, to forget them

    def __len__(self) -> int:
        """How many slots are held (granted or being granted)."""
        return len(self._slots)

    async def lease_for(self, deadline: float, now: float) -> int:
        """The lease to put an entry due at `deadline` on (epoch seconds, as `now`).

        Grants one if its slot has none (StoreError as grant_lease raises it;
        the next call tries again). Callers of one slot share one grant; one
        that is cancelled leaves it to the others.
        """
        self._forget_ended(now)
        slot = slot_for(deadline, now, self.granularity)
        held = self._slots.get(slot.index)
        if held is None:
            held = self._slots[slot.index] = _Held()
            heapq.heappush(self._ends, slot.index)
            held.grant = asyncio.create_task(self._grant(slot, held))
            held.grant.add_done_callback(_seen)
        if held.lease:
            return held.lease
        assert held.grant is not None
        return await asyncio.shield(held.grant)

    def forget(self, lease: int) -> None:
        """Drop the slot of a lease a write reported gone (LeaseLost): its next call grants anew.

        etcd does not say which lease of a failed transaction is gone: forget
        each lease the failed batch used (a live one costs one grant more).
        """
        for index, held in list(self._slots.items()):
            if lease and held.lease == lease:  # 0: a grant still under way, never lost
                del self._slots[index]

    async def close(self) -> None:
        """Cancel the grants under way and forget every slot (the leases expire by themselves)."""
        pending = [held.grant for held in self._slots.values() if held.grant and not held.lease]
        self._slots.clear()
        self._ends.clear()
        for grant in pending:
            grant.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _grant(self, slot: Slot, held: _Held) -> int:
        try:
            lease = await self.store.grant_lease(slot.ttl)
        except BaseException:
            if self._slots.get(slot.index) is held:
                del self._slots[slot.index]  # not cached: the next call tries again
            raise
        self.grants += 1
        held.lease = lease
        return lease

    def _forget_ended(self, now: float) -> None:
        while self._ends and self._ends[0] * self.granularity <= now:
            self._slots.pop(heapq.heappop(self._ends), None)


def _seen(grant: asyncio.Task[int]) -> None:
    """Mark a failed grant's error as seen: its callers got it, or all were cancelled."""
    if not grant.cancelled():
        grant.exception()
