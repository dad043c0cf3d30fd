"""The driver of a keyed table (vmbox.keyed): reads on a miss, writes behind, commits.

One KeyedSync per shared table of a replica. What the table asks for, it does
on the replica's event loop, never on the packet path:

- `fetch(key)`: one linearizable get; a key several packets wait for is read
  once (the table asks once). The answer goes to the table (`loaded`), and
  the packets that waited are decided again. A read that fails or takes
  longer than `read_timeout` counts as absent: the firewall then drops the
  packet, the safe side.
- writes: the table's queued writes are written every `flush_interval` in
  one batch (`Store.apply`: transactions of up to 128 operations), each put
  on the lease of its slot (vmbox.state.leaseslots), so the store forgets an
  entry by itself after its `expires` even when every replica is dead.
- `commit(key)`: a durable put: the batch is written now, and the packet
  waits for it (and only it). A batch that fails goes back to the table and
  is tried again at the next flush; its waiters are released (they pass on
  what memory holds: the store being away is the fail policy's business).

Cost per new TCP connection through the firewall: one put (durable) when it
is established and one delete when it ends, each batched with the others of
its flush, plus one renewal per `tcp_established / 2` of activity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from vmbox.keyed import KeyedTable, Write
from vmbox.state.leaseslots import LeaseSlots
from vmbox.state.store import LeaseLost, Put, Store, StoreError

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.05  # seconds between write-behind batches
READ_TIMEOUT = 1.0  # a read of a key a packet waits for; past it, the key counts as absent
WRITE_TIMEOUT = 2.0
SLOT = 5.0  # lease slot granularity: an entry outlives its expiry by at most this (+1 s)


class KeyedSync:
    """Move one keyed table's entries between memory and the store."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        table: KeyedTable,
        *,
        flush_interval: float = FLUSH_INTERVAL,
        read_timeout: float = READ_TIMEOUT,
        slot: float = SLOT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.table = table
        self.flush_interval = flush_interval
        self.read_timeout = read_timeout
        self.clock = clock
        self.slots = LeaseSlots(store, slot)
        self._reads: dict[str, asyncio.Future[None]] = {}
        self._commits: dict[str, asyncio.Future[None]] = {}
        self._waiting: dict[str, int] = {}  # packets decided after a read of the key
        self._wake = asyncio.Event()
        self._failing = False
        self.batches = 0  # write batches that reached the store

    # -- what held packets wait for ----------------------------------------------------------

    async def fetch(self, key: str) -> None:
        """Read `key` into the table (once, however many packets wait for it)."""
        self._waiting[key] = self._waiting.get(key, 0) + 1
        pending = self._reads.get(key)
        if pending is None:
            pending = self._reads[key] = asyncio.ensure_future(self._read(key))
        await asyncio.shield(pending)

    async def _read(self, key: str) -> None:
        try:
            kv = await asyncio.wait_for(
                self.store.get(self.prefix + key, timeout=self.read_timeout), self.read_timeout
            )
        except (StoreError, TimeoutError) as exc:
            log.debug("keyed %s: read of %s failed: %s", self.table.name, key, exc)
            self.table.failed(key)
        else:
            self.table.loaded(key, None if kv is None else kv.value)
        finally:
            self._reads.pop(key, None)

    async def commit(self, key: str) -> None:
        """Wait until the table's queued write of `key` is in the store (or failed)."""
        if not self.table.committing(key):
            return  # written already, by a flush that ran before this packet's turn
        waiter = self._commits.get(key)
        if waiter is None:
            waiter = self._commits[key] = asyncio.get_running_loop().create_future()
        self._wake.set()
        await asyncio.shield(waiter)

    def settled(self, key: str) -> None:
        """A packet that waited for `key` was decided; the last one lets the table forget
        what the read found (so the packets of one read all see the same answer)."""
        left = self._waiting.get(key, 0) - 1
        if left > 0:
            self._waiting[key] = left
            return
        self._waiting.pop(key, None)
        self.table.settled(key)

    # -- the write-behind loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Write the table's queued writes every flush_interval, or at once for a commit."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval)
                self._wake.clear()
                await self.flush()
        finally:
            for waiter in self._commits.values():
                if not waiter.done():
                    waiter.set_result(None)
            self._commits.clear()

    async def flush(self) -> None:
        """Write what the table has queued, in one batch; report back to the table."""
        writes = self.table.take_writes()
        if not writes:
            self._release(self.table.written([], ok=True))
            return
        ok = await self._write(writes)
        self._release(self.table.written(writes, ok))

    async def _write(self, writes: list[Write]) -> bool:
        now = self.clock()
        leases: set[int] = set()
        try:
            puts = []
            deletes = []
            for write in writes:
                if write.value is None:
                    deletes.append(self.prefix + write.key)
                    continue
                lease = await self.slots.lease_for(max(write.expires, now + 1.0), now)
                leases.add(lease)
                puts.append(Put(self.prefix + write.key, write.value, lease))
            await asyncio.wait_for(self.store.apply(puts, deletes), WRITE_TIMEOUT)
        except (StoreError, TimeoutError) as exc:
            if isinstance(exc, LeaseLost):
                for lease in leases:
                    self.slots.forget(lease)
            if not self._failing:
                log.warning(
                    "keyed %s: %d writes failed, kept to retry: %s",
                    self.table.name,
                    len(writes),
                    exc,
                )
            self._failing = True
            return False
        if self._failing:
            log.info("keyed %s: writes reach the store again", self.table.name)
        self._failing = False
        self.batches += 1
        return True

    def _release(self, keys: list[str]) -> None:
        for key in keys:
            waiter = self._commits.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        # A commit whose entry is no longer committing (evicted, deleted) is over too.
        for key in [k for k in self._commits if not self.table.committing(k)]:
            waiter = self._commits.pop(key)
            if not waiter.done():
                waiter.set_result(None)
