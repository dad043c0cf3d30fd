"""Keyed state: a middlebox's table of many small entries, one per key, shared through etcd.

A scalar state item (vmbox.middlebox.StateItem: a limit) is one value every
replica keeps fresh. Keyed state is the other kind a middlebox needs: many
entries (one per connection, per flow, per allocated port) of which a replica
needs only the ones its packets touch, and which must outlive the replica
that wrote them. A middlebox declares a `KeyedItem` per table; the replica
gives it a `KeyedTable` (this module, pure: no I/O, no clock read, `now` is
passed in) and a driver (vmbox.state.keyedsync) that moves entries between
the table and the store. The contract between the two:

- `get(key, now)` answers from memory: the entry's value, None (no such
  entry), or a `Wait` asking the driver to read the key. A packet whose
  middlebox returns a Wait is held by the data plane (other packets go on)
  until the read is done, then decided again, when `get` answers from what
  was read. Reads are linearizable, so a key whose write was durable before
  the read began is seen.
- `put(key, value, expires, durable=...)` changes memory at once and queues
  the write; the driver writes queued writes in batches (write-behind). A
  `durable` put returns a Wait: the packet that made it is held until the
  write is in the store, and so is every packet that reads the key
  meanwhile, so nothing that depends on the entry passes before another
  replica could read it.
- Every write carries `expires`: the driver puts the key on a lease that
  ends at or shortly after it (vmbox.state.leaseslots), so the store forgets
  an entry nobody renews even when every replica is dead. Renewing is the
  middlebox's business: a `put` with a later `expires`.

Invariants (unit-tested in tests/unit/test_keyed.py):

1. Bounded memory: at most `max_entries` entries (least recently used clean
   ones are evicted first: they are in the store and can be read again), at
   most `max_fetching` keys being read, at most `2 * max_entries` queued
   writes (the oldest dropped first; their leases end them in the store).
2. Bounded reads: a key no entry holds is read only while the fetch budget
   (a token bucket, `fetch_rate` per second up to `fetch_burst`) allows; past
   it `get` answers None, as for an absent key, and counts a refusal. A flood
   of packets for keys that do not exist (an ACK scan) costs the store at
   most `fetch_rate` reads a second per replica.
3. A key has at most one read in flight; packets that wait for it share it.
4. `local` tables (shared=False) never ask the driver for anything: no
   reads, no writes, durable puts are durable at once. The same middlebox
   code runs on them, which is what shows that shared state carries what
   local state cannot (a connection's packets on a replica that did not see
   it open).
5. After `invalidate()` (the replica group changed, so flows may have moved
   between replicas and another replica may have changed an entry this one
   holds), each clean entry is read again once, at its next use, if the
   fetch budget allows; otherwise the cached value stands.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_ENTRIES = 65536
MAX_FETCHING = 1024
FETCH_RATE = 2000.0  # reads per second of keys no entry holds, per replica and table
FETCH_BURST = 200


@dataclass(frozen=True, slots=True)
class KeyedItem:
    """A table of keyed state a middlebox declares.

    Its entries live under /vmbox/<service>/keyed/<name>/<key> (vmbox.state.keys).
    `parse` turns stored bytes into a value and raises ValueError on garbage
    (the entry then counts as absent); `encode` is its inverse.
    """

    name: str
    parse: Callable[[bytes], Any]
    encode: Callable[[Any], bytes]


@dataclass(frozen=True, slots=True)
class Wait:
    """What `process()` returns for a packet it cannot decide yet.

    `table`'s `key` must be read from the store (commit False), or the writes
    queued for it must be durable (commit True); then the packet is decided
    again. The data plane holds only this packet: the others go on.
    """

    table: str
    key: str
    commit: bool = False


@dataclass(frozen=True, slots=True)
class Write:
    """One queued write: a put of `value` (None: a delete) the store may drop after `expires`.

    `seq` orders a table's writes: a commit ends only when a write at least as
    new as the durable put is reported written.
    """

    key: str
    value: bytes | None
    expires: float
    seq: int = field(default=0, compare=False)


@dataclass(slots=True)
class _Entry:
    value: Any
    stale: bool = False  # read again at the next use (invalidate())
    commit: int = 0  # the seq of a durable put not yet confirmed (0: none)


@dataclass(slots=True)
class TableCounts:
    """What a table did, for metrics (monotonic, except `entries` and `queued`)."""

    hits: int = 0
    fetches: int = 0
    fetch_refused: int = 0
    fetch_failed: int = 0
    writes: int = 0
    write_failures: int = 0
    evicted: int = 0
    dropped_writes: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class KeyedTable:
    """One table's entries in memory and the writes they owe the store (pure)."""

    def __init__(
        self,
        item: KeyedItem,
        *,
        shared: bool = True,
        max_entries: int = MAX_ENTRIES,
        max_fetching: int = MAX_FETCHING,
        fetch_rate: float = FETCH_RATE,
        fetch_burst: int = FETCH_BURST,
    ) -> None:
        self.item = item
        self.name = item.name
        self.shared = shared
        self.max_entries = max_entries
        self.max_fetching = max_fetching
        self.fetch_rate = fetch_rate
        self.fetch_burst = fetch_burst
        self.counts = TableCounts()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._outbox: OrderedDict[str, Write] = OrderedDict()
        self._fetching: set[str] = set()
        self._outcomes: dict[str, Any] = {}  # what a read found, until the driver settles it
        self._inflight: dict[str, int] = {}  # keys of writes taken and not yet reported
        self._seq = 0
        self._tokens = float(fetch_burst)
        self._refilled: float | None = None

    # -- the middlebox's side --------------------------------------------------------

    def get(self, key: str, now: float) -> Any:
        """The entry's value, None if there is none, or a Wait for the driver to read it."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            if entry.commit:
                return Wait(self.name, key, commit=True)
            if entry.stale and self.shared and key not in self._outcomes:
                if key in self._fetching or self._may_fetch(now):
                    self._fetching.add(key)
                    return Wait(self.name, key)
                entry.stale = False  # no budget: the cached value stands
            self.counts.hits += 1
            return entry.value
        if key in self._outcomes:
            return self._outcomes[key]
        if not self.shared:
            return None
        if key in self._fetching:
            return Wait(self.name, key)
        if not self._may_fetch(now):
            self.counts.fetch_refused += 1
            return None
        self._fetching.add(key)
        return Wait(self.name, key)

    def peek(self, key: str) -> Any:
        """The value memory holds for `key` (None if none), asking nobody."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def put(self, key: str, value: Any, expires: float, *, durable: bool = False) -> Wait | None:
        """Set the entry now and queue its write; a durable put returns the Wait for it."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(value)
        else:
            entry.value = value
            entry.stale = False
            self._entries.move_to_end(key)
        self._outcomes.pop(key, None)
        if not self.shared:
            self._bound()
            return None
        write = self._queue(key, self.item.encode(value), expires)
        if durable:
            entry.commit = write.seq  # before the bound: a commit is never evicted
        self._bound()
        return Wait(self.name, key, commit=True) if durable else None

    def delete(self, key: str, expires: float) -> None:
        """Forget the entry and queue its delete (a lost delete stops mattering at `expires`)."""
        self._entries.pop(key, None)
        self._outcomes.pop(key, None)
        if self.shared:
            self._queue(key, None, expires)

    def forget(self, key: str) -> None:
        """Drop the entry from memory only (the store keeps it, and its lease ends it)."""
        self._entries.pop(key, None)

    def items(self) -> Iterator[tuple[str, Any]]:
        """The entries in memory, least recently used first (a copy: safe to change the table)."""
        return iter([(key, entry.value) for key, entry in self._entries.items()])

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def invalidate(self) -> None:
        """Read each clean entry again at its next use (the group changed: flows moved)."""
        if not self.shared:
            return
        for key, entry in self._entries.items():
            if not self._dirty(key, entry):
                entry.stale = True

    # -- the driver's side -------------------------------------------------------------

    def committing(self, key: str) -> bool:
        """A durable put of `key` is not yet confirmed."""
        entry = self._entries.get(key)
        return entry is not None and entry.commit > 0

    @property
    def queued(self) -> int:
        """Writes waiting for the driver."""
        return len(self._outbox)

    @property
    def fetching(self) -> int:
        """Keys being read."""
        return len(self._fetching)

    def take_writes(self) -> list[Write]:
        """Every queued write, oldest first; the table forgets them (written() reports back)."""
        writes = list(self._outbox.values())
        self._outbox.clear()
        for write in writes:
            self._inflight[write.key] = self._inflight.get(write.key, 0) + 1
        return writes

    def written(self, writes: list[Write], ok: bool) -> list[str]:
        """The driver wrote (or failed to write) `writes`; the keys whose commit is over.

        A failed batch goes back to the queue (unless newer writes replaced
        its keys meanwhile) to be tried with the next one. Either way a
        durable put's commit is over: its packets are decided again, and
        pass on what memory holds (the store being away is the fail
        policy's business, not each packet's).
        """
        done = []
        for write in writes:
            left = self._inflight.get(write.key, 0) - 1
            if left > 0:
                self._inflight[write.key] = left
            else:
                self._inflight.pop(write.key, None)
        if ok:
            self.counts.writes += len(writes)
        else:
            self.counts.write_failures += len(writes)
            for write in writes:
                if write.key not in self._outbox:
                    self._requeue(write)
        for write in writes:
            entry = self._entries.get(write.key)
            if entry is not None and 0 < entry.commit <= write.seq:
                entry.commit = 0
                done.append(write.key)
        return done

    def loaded(self, key: str, raw: bytes | None) -> None:
        """A read of `key` found `raw` (None: absent, or the read failed)."""
        self._fetching.discard(key)
        self.counts.fetches += 1
        entry = self._entries.get(key)
        if key in self._outbox or key in self._inflight or (entry is not None and entry.commit):
            # This replica's own write (a put or a delete) is newer than what was read.
            if entry is not None:
                entry.stale = False
            else:
                self._outcomes[key] = None
            return
        value = None
        if raw is not None:
            try:
                value = self.item.parse(raw)
            except ValueError:
                value = None
        if value is None:
            self._entries.pop(key, None)
            self._outcomes[key] = None
            return
        if entry is None:
            self._entries[key] = _Entry(value)
            self._bound()
        else:
            entry.value = value
            entry.stale = False

    def failed(self, key: str) -> None:
        """A read of `key` failed: its packets are decided as if it were absent."""
        self.counts.fetch_failed += 1
        entry = self._entries.get(key)
        self._fetching.discard(key)
        if entry is not None:
            entry.stale = False  # keep what memory holds
            return
        self._outcomes[key] = None

    def settled(self, key: str) -> None:
        """The packets that waited for `key` were decided: forget what the read found."""
        self._outcomes.pop(key, None)

    # -- bounds --------------------------------------------------------------------------

    def _may_fetch(self, now: float) -> bool:
        if len(self._fetching) >= self.max_fetching:
            return False
        if self._refilled is not None and now > self._refilled:
            self._tokens = min(
                float(self.fetch_burst), self._tokens + (now - self._refilled) * self.fetch_rate
            )
        self._refilled = now if self._refilled is None else max(self._refilled, now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _dirty(self, key: str, entry: _Entry) -> bool:
        """Memory holds something newer than the store may (a write queued or in flight)."""
        return bool(entry.commit) or key in self._outbox or key in self._inflight

    def _bound(self) -> None:
        """Evict least recently used entries past max_entries: clean ones first (the store
        has them), then dirty ones (their writes stay queued; a read of them meanwhile
        is ignored); never one mid-commit."""
        while len(self._entries) > self.max_entries:
            victim = next((k for k, e in self._entries.items() if not self._dirty(k, e)), None)
            if victim is None:
                victim = next((k for k, e in self._entries.items() if not e.commit), None)
            if victim is None:
                return  # every entry is mid-commit: the next commit frees one
            del self._entries[victim]
            self.counts.evicted += 1

    def _queue(self, key: str, value: bytes | None, expires: float) -> Write:
        self._seq += 1
        write = Write(key, value, expires, self._seq)
        self._requeue(write)
        return write

    def _requeue(self, write: Write) -> None:
        self._outbox.pop(write.key, None)
        self._outbox[write.key] = write
        while len(self._outbox) > 2 * self.max_entries:
            _, dropped = self._outbox.popitem(last=False)
            self.counts.dropped_writes += 1
            entry = self._entries.get(dropped.key)
            if entry is not None and entry.commit:
                entry.commit = 0  # its packets go on: the driver releases them (committing())
