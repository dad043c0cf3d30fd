"""MemoryStore: the whole Store protocol in one process's memory, for fast tests.

The unit tests of the state layer (views, membership, demand, the resize
guard's watcher, the health probe) and of the controller's helpers run on it
in milliseconds. tests/contract/test_store_contract.py runs one suite against
it and against a real etcd, so it behaves as etcd does where vmbox looks:

- Revisions: an empty store is at revision 1; each write transaction adds one
  (a put, a CAS that wrote, a delete or a revoke that removed anything, each
  transaction of an apply that changed anything; all keys a delete_prefix, a
  revoke or an apply's transaction changes share its revision, with events in
  the order etcd gives them). Reads, lease grants and refreshes, failed CASes
  and deletes of nothing add none.
- Leases expire when the clock reaches their deadline (grant or last refresh
  plus the TTL): checked at every call, and by `expire()` or `advance()`. A
  test drives them with a `FakeClock`; with a real clock, open watches also
  wake at the next deadline, so a key nobody touches still vanishes in time.
  Writing on a lease that is gone raises LeaseLost, as refreshing it does (an
  apply's transaction with such a put writes nothing); revoking it again is no
  error.
- Watches deliver every event under their prefix once, in revision order,
  from `start_revision` on (0: from the next write), replaying the history,
  which is kept whole (nothing is compacted). A delete event has an empty value.
- `available = False` makes every call raise StoreUnavailable, as an etcd
  that does not answer; open watches stay silent meanwhile (an etcd watch
  stream says nothing during an outage) and go on where they were when it is
  back, each counted once in `watch_resumes`.
- After `close()` every call raises StoreError, and open watches raise it at
  their next step. (etcd3aio cancels the tasks consuming its watches instead.)

Each call is a suspension point, as a call over the network is, but none
waits: `timeout` is accepted and has nothing to bound.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from vmbox.state.store import (
    KeyValue,
    LeaseLost,
    Put,
    StoreError,
    StoreUnavailable,
    WatchEvent,
    transactions,
)


class FakeClock:
    """A clock that moves only when told: `clock()` reads it, `advance(s)` moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.now += seconds


@dataclass(slots=True)
class _Lease:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


class MemoryStore:
    """The Store protocol over dicts, with a settable clock and a switch for outages."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, name: str = "memory"
    ) -> None:
        self.endpoints: tuple[str, ...] = (name,)
        self.clock = clock
        self.down_reason = "connection refused"  # what StoreUnavailable says while unavailable
        self._available = True
        self._closed = False
        self._revision = 1  # an empty etcd is at revision 1
        self._data: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x7F00)
        self._history: list[WatchEvent] = []
        self._history_revisions: list[int] = []  # parallel to _history, for bisect
        self._wakers: set[asyncio.Event] = set()  # one per open watch
        self._resumes = 0

    # -- what tests drive --------------------------------------------------

    @property
    def available(self) -> bool:
        return self._available

    @available.setter
    def available(self, available: bool) -> None:
        if available and not self._available:
            self._resumes += len(self._wakers)  # every open watch goes on where it was
        self._available = available
        self._wake()

    @property
    def revision(self) -> int:
        """The store's current revision (no call: readable while unavailable)."""
        return self._revision

    def advance(self, seconds: float) -> int:
        """Move the FakeClock on by `seconds` and expire what is due; returns leases expired."""
        if not isinstance(self.clock, FakeClock):
            raise TypeError("advance() needs a MemoryStore built with clock=FakeClock()")
        self.clock.advance(seconds)
        return self.expire()

    def expire(self) -> int:
        """Revoke every lease whose deadline the clock has reached; returns how many."""
        now = self.clock()
        due = [lease for lease, held in self._leases.items() if now >= held.deadline]
        for lease in due:
            self._revoke(lease)
        return len(due)

    # -- the Store protocol ------------------------------------------------

    @property
    def watch_resumes(self) -> int:
        """Open watches carried over an outage (one per watch per outage)."""
        return self._resumes

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        await self._enter(f"get {key}", key)
        return self._data.get(key)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        await self._enter(f"get {prefix}*", prefix)
        return self._under(prefix), self._revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        await self._enter(f"put {key}", key)
        self._need_lease(lease, f"put {key}")
        return self._put(key, value, lease)

    async def delete(self, key: str) -> bool:
        await self._enter(f"delete {key}", key)
        return self._delete([key] if key in self._data else []) > 0

    async def delete_prefix(self, prefix: str) -> int:
        await self._enter(f"delete {prefix}*", prefix)
        return self._delete([kv.key for kv in self._under(prefix)])

    async def compare_and_swap(
        self, key: str, expected: bytes | None, value: bytes, *, lease: int = 0
    ) -> bool:
        await self._enter(f"cas {key}", key)
        current = self._data.get(key)
        holds = (
            current is None
            if expected is None
            else (current is not None and current.value == expected)
        )
        if not holds:
            return False
        self._need_lease(lease, f"cas {key}")  # etcd checks the lease of the branch it takes
        self._put(key, value, lease)
        return True

    async def apply(self, puts: Sequence[Put], deletes: Sequence[str] = ()) -> int:
        """As etcd: one transaction per `transactions(puts, deletes)` (Store.apply)."""
        for txn_puts, txn_deletes in transactions(puts, deletes):
            what = f"apply of {len(txn_puts)} puts and {len(txn_deletes)} deletes"
            await self._enter(what)  # each transaction is a call of its own
            for put in txn_puts:
                self._need_lease(put.lease, what)  # before anything of it is written
            self._commit(txn_puts, [key for key in txn_deletes if key in self._data])
        return self._revision

    async def grant_lease(self, ttl: int) -> int:
        await self._enter("lease grant")
        lease = next(self._lease_ids)
        self._leases[lease] = _Lease(ttl, self.clock() + ttl)
        return lease

    async def refresh_lease(self, lease: int) -> int:
        await self._enter(f"keep-alive of lease {lease:x}")
        held = self._leases.get(lease)
        if held is None:
            raise LeaseLost(f"lease {lease:x} expired or was revoked")
        held.deadline = self.clock() + held.ttl
        return held.ttl

    async def revoke_lease(self, lease: int) -> None:
        await self._enter(f"revoke lease {lease:x}")
        self._revoke(lease)  # one that is gone already: the outcome the caller wanted

    async def watch_prefix(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchEvent]:
        """Every event under `prefix` from `start_revision` on (0: from the next write)."""
        wake = asyncio.Event()
        self._wakers.add(wake)
        try:
            position: int | None = None  # in the history, once the start is fixed
            start = start_revision
            while True:
                self._check_open()
                self.expire()
                if self._available:
                    if position is None:
                        start = start if start > 0 else self._revision + 1
                        position = bisect.bisect_left(self._history_revisions, start)
                    if position < len(self._history):
                        event = self._history[position]
                        position += 1
                        if event.revision >= start and event.key.startswith(prefix):
                            yield event
                        continue
                wake.clear()
                await self._sleep(wake)
        finally:
            self._wakers.discard(wake)

    async def close(self) -> None:
        self._closed = True
        self._wake()

    # -- the workings ------------------------------------------------------

    async def _enter(self, what: str, key: str | None = None) -> None:
        await asyncio.sleep(0)  # a suspension point, as a call over the network is
        self._check_open()
        self.expire()
        if not self._available:
            raise StoreUnavailable(f"memory store unavailable for {what} ({self.down_reason})")
        if key == "":
            raise StoreError(f"memory store {what} failed: key is not provided")  # as etcd says

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"memory store {self.endpoints[0]} is closed")

    def _need_lease(self, lease: int, what: str) -> None:
        if lease and lease not in self._leases:
            raise LeaseLost(f"{what}: the lease is gone (requested lease not found)")

    def _under(self, prefix: str) -> list[KeyValue]:
        return [self._data[key] for key in sorted(self._data) if key.startswith(prefix)]

    def _put(self, key: str, value: bytes, lease: int) -> int:
        self._commit([Put(key, value, lease)], [])
        return self._revision

    def _delete(self, keys: Iterable[str]) -> int:
        """Delete `keys` (all present) in one revision, in key order; none: no revision."""
        doomed = sorted(keys)
        self._commit([], doomed)
        return len(doomed)

    def _commit(self, puts: Sequence[Put], deletes: Sequence[str]) -> None:
        """One transaction: the puts, then the deletes (all present), in one revision."""
        if not puts and not deletes:
            return
        self._revision += 1
        events: list[WatchEvent] = []
        for put in puts:
            self._detach(put.key)
            if put.lease:
                self._leases[put.lease].keys.add(put.key)
            self._data[put.key] = KeyValue(put.key, bytes(put.value), self._revision, put.lease)
            events.append(WatchEvent("put", put.key, bytes(put.value), self._revision))
        for key in deletes:
            self._detach(key)
            del self._data[key]
            events.append(WatchEvent("delete", key, b"", self._revision))
        self._record(events)

    def _detach(self, key: str) -> None:
        old = self._data.get(key)
        if old is not None and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)

    def _revoke(self, lease: int) -> None:
        held = self._leases.pop(lease, None)
        if held is not None:
            self._delete(held.keys)

    def _record(self, events: list[WatchEvent]) -> None:
        self._history.extend(events)
        self._history_revisions.extend(event.revision for event in events)
        self._wake()

    def _wake(self) -> None:
        for wake in self._wakers:
            wake.set()

    async def _sleep(self, wake: asyncio.Event) -> None:
        """Until the store changes; with a real clock, no later than the next lease deadline."""
        deadline = None
        if not isinstance(self.clock, FakeClock) and self._leases:
            deadline = min(held.deadline for held in self._leases.values()) - self.clock()
        try:
            async with asyncio.timeout(None if deadline is None else max(deadline, 0.0)):
                await wake.wait()
        except TimeoutError:
            pass
