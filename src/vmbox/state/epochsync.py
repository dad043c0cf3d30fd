"""EpochSync: the resize guard's watcher, the thin asyncio layer over vmbox.state.epoch.

vmbox.replica runs one per replica. It follows the member set and every
replica's ack under /vmbox/<service>/acks/ (with `watch_snapshots`, so store
outages heal by re-listing), feeds both to the pure `ResizeGuard`, writes this
replica's ack on its membership lease whenever the applied set or the lease
changes, and wakes at the times the guard may lift. Each new `Group` goes to
`apply`; the data plane calls `catch_up` so a lift is in place before the
first packet of a window. Why this keeps shares safe is argued in
vmbox.state.epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from vmbox.group import Group
from vmbox.state import keys
from vmbox.state.epoch import ResizeGuard, encode_ack, parse_ack
from vmbox.state.membership import watch_snapshots
from vmbox.state.store import KeyValue, Store, StoreError

# The module's name before the pure guard and its watcher were split: log lines keep it.
log = logging.getLogger("vmbox.state.epoch")

LEASE_CHECK = 0.5  # seconds between checks that the ack sits on the current lease
LEASE_WAIT = 0.02  # the same while an ack waits for the first lease (a fresh replica)
TIMER_SLACK = 0.0005  # wake this long after a boundary, so floor(now / window) has moved


class EpochSync:
    """Follows members and acks, writes this replica's ack, hands each new group to `apply`."""

    def __init__(
        self,
        store: Store,
        service: str,
        guard: ResizeGuard,
        apply: Callable[[Group], None],
        *,
        clock: Callable[[], float] = time.time,
        follow_acks: bool = True,
    ) -> None:
        self.store = store
        self.service = service
        self.guard = guard
        # Watch every replica's ack here (the protocol before the aggregator: N^2 watch
        # events per resize); False: the aggregator's summary comes through `see_summary`.
        self.follow_acks = follow_acks
        self.apply = apply
        self.clock = clock
        self.key = keys.ack_key(service, guard.me)
        self.ack_errors = 0
        self._applied: Group | None = None
        # When the guard may lift (inf: not waiting). The data plane calls
        # `catch_up` once a packet's time reaches it, so the lift is in place
        # before the first packet of the new window, whatever the timer does.
        self.due = math.inf
        self._written: tuple[frozenset[str], int] | None = None  # (set, lease) last written
        self._written_at = 0  # revision of that write
        self._dirty = asyncio.Event()  # the ack may need (re)writing
        self._wake = asyncio.Event()

    async def run(self, lease: Callable[[], int]) -> None:
        """Until cancelled; `lease()` is the membership lease (0 while unregistered)."""
        self._apply()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_members())
            if self.follow_acks:
                tasks.create_task(self._follow_acks())
            tasks.create_task(self._write_acks(lease))
            tasks.create_task(self._timer())

    def catch_up(self, now: float) -> None:
        """Lift a guard that is due at `now` (the data plane calls it; no I/O)."""
        self.guard.tick(now)
        self._apply()

    def _apply(self, wake: bool = True) -> None:
        group = self.guard.group
        if group != self._applied:
            self._applied = group
            self.apply(group)
        due = self.guard.wake_at()
        self.due = math.inf if due is None else due
        if wake:
            self._wake.set()  # the guard's state changed: recompute the timer

    async def _follow_members(self) -> None:
        # Survives store outages: the watch re-lists after reconnecting.
        prefix = keys.members_prefix(self.service)
        async for revision, members in watch_snapshots(self.store, prefix, _present):
            if self.guard.see_members(members, revision, self.clock()):
                self._apply()  # applied before the ack is written: the ack's promise
                self._dirty.set()

    async def _follow_acks(self) -> None:
        prefix = keys.acks_prefix(self.service)
        async for revision, acks in watch_snapshots(self.store, prefix, parse_ack):
            windows = {r: a.window for r, a in acks.items() if a.window is not None}
            self.guard.see_acks({r: a.members for r, a in acks.items()}, self.clock(), windows)
            self._apply()
            mine, written = acks.get(self.guard.me), self._written
            if (
                written is not None
                and revision >= self._written_at
                and (mine is None or mine.members != written[0])
            ):
                self._written = None  # deleted or overwritten behind our back
                self._dirty.set()

    def see_summary(self, acks: dict[str, frozenset[str]], windows: dict[str, int]) -> None:
        """The acks of the sets every member acked, from the aggregator's summary
        (vmbox.state.summary.as_acks): the guard takes them as its own watch's."""
        self.guard.see_acks(acks, self.clock(), windows)
        self._apply()

    def leaving(self) -> None:
        """Take nothing from now on (before the lease is revoked): see ResizeGuard.leaving."""
        self.guard.leaving()
        self._apply()

    def rejoined(self) -> None:
        """Registered again on a new lease: take nothing until the group settles again
        (ResizeGuard.rejoined); the ack goes out on the new lease at once."""
        self.guard.rejoined(self.clock())
        self._apply()
        self._dirty.set()

    async def _write_acks(self, lease_of: Callable[[], int]) -> None:
        delay = 0.1
        while True:
            lease, view = lease_of(), self.guard.view
            if lease and (view, lease) != self._written:
                try:
                    value = encode_ack(view, self.guard.revision, self.guard.view_window)
                    self._written_at = await self.store.put(self.key, value, lease=lease)
                    self._written, delay = (view, lease), 0.1
                except StoreError as exc:
                    # Unacknowledged, everyone (this replica too) stays guarded.
                    self.ack_errors += 1
                    log.debug("replica %s cannot write its ack: %s", self.guard.me, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that lands as the event is set, and the task lives on.
            # An ack that waits for a lease (registration under way) is written
            # as soon as there is one: everyone stays guarded until it is.
            check = LEASE_WAIT if not lease else LEASE_CHECK
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(check):
                    await self._dirty.wait()
            self._dirty.clear()

    async def _timer(self) -> None:
        while True:
            wake = self.guard.wake_at()
            timeout = None if wake is None else max(0.0, wake - self.clock()) + TIMER_SLACK
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            self.guard.tick(self.clock())
            self._apply(wake=False)


def _present(kv: KeyValue) -> bool:
    return True  # a member key, whatever its info
