"""The consistency modes of DESIGN.md as view classes over one shared state item.

The replica (vmbox.replica) builds one view per shared item with `make_view`,
runs `view.run()` as a task, and gets each new value through `on_change`. The
data plane awaits `StrongView.read()` before deciding a batch of packets.

All views are fail-static: when the store cannot be reached they keep the
last value, set `stale`, and log once when that starts and once when it ends.
A stored value that does not parse (StateValueError) is logged, counted in
`bad_values`, shown in `last_error`, and the last good value is kept. A deleted
key also keeps the last value: the controller seeds items, it does not unset them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

from vmbox.middlebox import StateItem, StateValueError
from vmbox.state.fence import Fence, encode_ack, probe_interval
from vmbox.state.readthread import Outcome, ReadThread
from vmbox.state.store import BlockingReads, KeyValue, Store, StoreError

log = logging.getLogger(__name__)

_MAX_BACKOFF = 2.0
JOIN_TIMEOUT = 2.0  # a read thread's read in flight ends within its timeout (at most 1 s here)


class View:
    """The current value of one item, kept fresh by `run()` according to the mode."""

    mode: ClassVar[str] = "local"

    def __init__(
        self,
        store: Store | None,
        key: str,
        item: StateItem,
        initial: Any,
        *,
        on_change: Callable[[Any], None] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.item = item
        self.value: Any = initial
        self.on_change = on_change
        self.stale = False
        self.last_error: str | None = None
        self.updates = 0  # times the value changed (on_change calls)
        self.bad_values = 0
        self._reads = 0  # successful reads or watch events handled on the loop
        self._threads: list[ReadThread] = []  # reads off the loop (`read_off_loop`)
        # Watch mode only: puts the watch stream delivered for this key, the
        # revision of the last one, and how often the stream had to be opened
        # again after an error (a resumed stream, e.g. over a leader change,
        # is not a re-open). The faults check these against what they wrote.
        self.watch_events = 0
        self.watch_revision = 0
        self.watch_reopens = 0
        self._seen_revision = 0

    async def run(self) -> None:
        """Keep the value fresh until cancelled; never raises on store errors."""

    @property
    def reads(self) -> int:
        """Successful reads (and watch events), on the loop or on a read thread."""
        return self._reads + sum(thread.quiet for thread in self._threads)

    @property
    def off_loop(self) -> bool:
        """Whether this view's periodic reads can run on a thread of their own."""
        return isinstance(self.store, BlockingReads)

    async def read_off_loop(
        self, interval: float, timeout: float, *, first_delay: float, max_backoff: float
    ) -> None:
        """Read every `interval` s on a ReadThread until cancelled (vmbox.state.readthread).

        The loop runs `take` only when a read found something new (a revision,
        the key gone, the store lost or back), so a quiet poll costs the packet
        path nothing. Cancelling wakes the thread and joins it."""
        store = self.store
        assert isinstance(store, BlockingReads)
        key = self.key
        thread = ReadThread(
            lambda: store.blocking_get(key, timeout=timeout),
            interval,
            self.take,
            asyncio.get_running_loop(),
            first_delay=first_delay,
            max_backoff=max_backoff,
            name=f"vmbox-read {key}",
        )
        self._threads.append(thread)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            thread.stop(0)  # wakes it; the join waits off the loop
            await asyncio.to_thread(thread.stop, JOIN_TIMEOUT)

    def take(self, outcome: Outcome) -> None:
        """A read thread's news, on the loop: as `refresh` would have handled that read."""
        if outcome.error is not None:
            self.mark_stale(outcome.error)
            return
        self.mark_fresh()
        self.apply_kv(outcome.kv)

    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError(f"{type(self).__name__} for {self.key} has no store")
        return self.store

    def apply(self, raw: bytes, revision: int) -> None:
        """Take a stored value seen at `revision` (older or already seen ones are ignored)."""
        self._reads += 1
        # Revisions only grow, so an older read racing a newer watch event
        # cannot undo it, and one garbage value is reported once, not per read.
        if revision and revision <= self._seen_revision:
            return
        self._seen_revision = max(self._seen_revision, revision)
        try:
            value = self.item.parse(raw)
        except StateValueError as exc:
            self.bad_values += 1
            self.last_error = f"{self.key}: {exc}; keeping {self.value!r}"
            log.warning("bad value for %s: %s; keeping %r", self.key, exc, self.value)
            return
        self.last_error = None
        if value != self.value:
            self.value = value
            self.updates += 1
            if self.on_change is not None:
                self.on_change(value)

    def apply_kv(self, kv: KeyValue | None) -> None:
        if kv is not None:
            self.apply(kv.value, kv.mod_revision)
        else:
            self._reads += 1

    def mark_stale(self, exc: StoreError) -> None:
        if not self.stale:
            log.warning("%s is stale, keeping %r: %s", self.key, self.value, exc)
        self.stale = True
        self.last_error = str(exc)

    def mark_fresh(self) -> None:
        if self.stale:
            log.info("%s is fresh again (value %r)", self.key, self.value)
            self.stale = False
            self.last_error = None

    async def refresh(self, timeout: float | None = None) -> bool:
        """One linearizable read applied to the view; False (and stale) if it failed."""
        try:
            kv = await self._store().get(self.key, timeout=timeout)
        except StoreError as exc:
            self.mark_stale(exc)
            return False
        self.mark_fresh()
        self.apply_kv(kv)
        return True


class LocalView(View):
    """The configured value alone: nothing to refresh, `run()` returns at once."""

    mode = "local"


class PollView(View):
    """A linearizable read every `interval` seconds (backing off while etcd is away).

    On an etcd store the reads run on a thread of their own and the loop hears
    only of changes (`read_off_loop`); on the memory store, on the loop.
    At 10 reads a second on the loop they cost it about 1% of its time, and
    every packet that arrives during one waits for it (DESIGN.md).
    """

    mode = "poll"

    def __init__(self, *args: Any, interval: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interval = interval

    async def run(self) -> None:
        if self.off_loop:
            interval, timeout = self.interval, max(self.interval, 1.0)
            await self.read_off_loop(interval, timeout, first_delay=0, max_backoff=_MAX_BACKOFF)
            return
        delay = self.interval
        while True:
            ok = await self.refresh(max(self.interval, 1.0))
            delay = self.interval if ok else min(max(delay * 2, self.interval), _MAX_BACKOFF)
            await asyncio.sleep(delay)


class WatchView(View):
    """An initial read, then the etcd watch from that read's revision on.

    A watch stream says nothing while etcd is away (or has lost quorum), so a
    cheap read every `probe_interval` seconds tells `stale` apart from quiet;
    it also heals any change the watch could have missed.
    """

    mode = "watch"

    def __init__(self, *args: Any, probe_interval: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe_interval = probe_interval

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow())
            group.create_task(self._probe())

    async def _follow(self) -> None:
        store = self._store()
        delay = 0.1
        opened = False
        while True:
            try:
                # get_prefix rather than get: it returns the store revision,
                # so the watch starts exactly after what was read.
                kvs, revision = await store.get_prefix(self.key)
                self.mark_fresh()
                self.apply_kv(next((kv for kv in kvs if kv.key == self.key), None))
                delay = 0.1
                self.watch_reopens += opened
                opened = True
                async for event in store.watch_prefix(self.key, revision + 1):
                    if event.key == self.key and event.kind == "put":
                        self.watch_events += 1
                        self.watch_revision = event.revision
                        self.apply(event.value, event.revision)
            except StoreError as exc:
                # Includes a watch whose history was compacted: re-read, re-watch.
                self.mark_stale(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF)

    async def _probe(self) -> None:
        # On the loop, unlike a poll view's reads: one read a second costs it about
        # 0.1% of its time, and a read thread would cost every replica of the
        # default mode 0.55 MiB (its malloc arena), 0.8 points of a 70 MiB pod.
        while True:
            await asyncio.sleep(self.probe_interval)
            await self.refresh(max(self.probe_interval, 1.0))


class StrongView(View):
    """A linearizable read per `read()` call: the data plane awaits it per packet batch.

    While etcd is away `read()` returns the last value at once (fail-static)
    instead of making every batch wait for a timeout; `run()` keeps probing
    with backoff and strong reads resume when etcd answers again.
    """

    mode = "strong"

    def __init__(self, *args: Any, read_timeout: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self._lost = asyncio.Event()

    async def run(self) -> None:
        delay = 0.1
        while True:
            if await self.refresh(self.read_timeout):
                delay = 0.1
                self._lost.clear()
                await self._lost.wait()  # read() sets it when it finds etcd gone
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)

    async def read(self) -> Any:
        """The value after one linearizable read (the last value if etcd is away)."""
        if not self.stale and not await self.refresh(self.read_timeout):
            self._lost.set()  # run() probes in the background until etcd is back
        return self.value


class FencedView(WatchView):
    """A watch view whose writer waits for it: acks on the member lease, a fence on reads.

    Reads stay local: the middlebox holds the value, as under `watch`. On top,
    `ack_key` holds the newest revision applied (written on the member lease,
    newest only: a burst of writes coalesces into fewer acks), and a probe every
    `probe_interval(ttl)` keeps the lease alive and reads the key; while no such
    probe succeeded within `fence_deadline(ttl)` the middlebox gets the item's
    `closed` value (admit nothing), then the current value again once one does.
    Why a writer that waits for "acked or lease gone" is never wrong:
    vmbox.state.fence. `lease_of` is set by the replica once it has a
    membership (0: unregistered, the item stays closed).
    """

    mode = "fenced"

    def __init__(
        self,
        *args: Any,
        ttl: float,
        ack_key: str,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, probe_interval=probe_interval(ttl), **kwargs)
        self.ack_key = ack_key
        self.clock = clock
        self.fence = Fence(ttl)
        self.lease_of: Callable[[], int] = lambda: 0
        self.acks = 0  # acks written
        self.ack_errors = 0
        self.closings = 0  # times the item closed (the fence deadline passed)
        self._acked: tuple[int, int] = (0, 0)  # (revision, lease) last written
        self._ack_due = asyncio.Event()
        self._tick = asyncio.Event()
        self._deliver = self.on_change
        self.on_change = self._changed  # values reach the middlebox only while open

    @property
    def closed(self) -> bool:
        return not self.fence.open

    @property
    def enforced(self) -> Any:
        """What the middlebox has now: the value, or the item's `closed` value."""
        return self.value if self.fence.open else self.item.closed

    def _changed(self, value: Any) -> None:
        if self.fence.open and self._deliver is not None:
            self._deliver(value)

    def apply(self, raw: bytes, revision: int) -> None:
        super().apply(raw, revision)
        if self._seen_revision > self._acked[0]:
            self._ack_due.set()

    async def run(self) -> None:
        # The middlebox was built with the configured value: closed until the first
        # probe on a lease succeeds.
        if self._deliver is not None and not self.fence.open:
            self._deliver(self.item.closed)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow())
            group.create_task(self._probe())
            group.create_task(self._close_on_time())
            group.create_task(self._write_acks())

    async def _probe(self) -> None:
        while True:
            try:
                # A keep-alive or read that hangs must not hold the next probe back.
                async with asyncio.timeout(self.fence.deadline):
                    await self.confirm()
            except TimeoutError:
                self._enforce()
            await asyncio.sleep(self.probe_interval)

    async def confirm(self) -> bool:
        """One probe: a keep-alive of the member lease, then a read; True if both worked.

        On an etcd store both run in an executor thread through its blocking
        channel (`_confirm_off_loop`): through the asyncio client they cost the
        packet loop about 1 ms each, four times a deadline."""
        lease = self.lease_of()
        self.fence.lease_changed(lease)
        if lease and self.off_loop:
            return await self._confirm_off_loop(lease)
        started = self.clock()
        if lease:
            try:
                await self._store().refresh_lease(lease)
            except StoreError as exc:
                self.mark_stale(exc)
                self._enforce()
                return False
        if not await self.refresh(max(self.probe_interval, 0.2)) or not lease:
            self._enforce()
            return False
        return self._confirmed(started, lease)

    async def _confirm_off_loop(self, lease: int) -> bool:
        store = self.store
        assert isinstance(store, BlockingReads)
        key, timeout, clock = self.key, max(self.probe_interval, 0.2), self.clock

        def probe() -> tuple[float, KeyValue | None]:
            # The fence counts from here: the keep-alive, then the read, in this order.
            started = clock()
            store.blocking_refresh_lease(lease, timeout=timeout)
            return started, store.blocking_get(key, timeout=timeout)

        try:
            started, kv = await asyncio.get_running_loop().run_in_executor(None, probe)
        except StoreError as exc:
            self.mark_stale(exc)
            self._enforce()
            return False
        self.mark_fresh()
        self.apply_kv(kv)
        return self._confirmed(started, lease)

    def _confirmed(self, started: float, lease: int) -> bool:
        if self.lease_of() != lease:  # registered again meanwhile: this probe was on the old one
            self._enforce()
            return False
        self.fence.confirmed(started, lease)
        self._enforce()
        self._ack_due.set()  # a new lease needs the ack on it
        return True

    def _enforce(self) -> None:
        """Tell the middlebox when the fence opened or closed; wake the closing timer."""
        step = self.fence.step(self.clock())
        if step == "closed":
            self.closings += 1
            log.warning("%s closed: not confirmed current for %.2fs", self.key, self.fence.deadline)
        elif step == "opened" and self.closings:
            log.info("%s open again (value %r)", self.key, self.value)
        if step is not None and self._deliver is not None:
            self._deliver(self.enforced)
        self._tick.set()

    async def _close_on_time(self) -> None:
        while True:
            wait = self.fence.closes_at() - self.clock() if self.fence.open else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if wait is None else max(wait, 0.0)):
                    await self._tick.wait()
            self._tick.clear()
            if self.fence.open and not self.fence.admits(self.clock()):
                self._enforce()

    async def _write_acks(self) -> None:
        delay = 0.05
        while True:
            await self._ack_due.wait()
            self._ack_due.clear()
            lease, revision = self.lease_of(), self._seen_revision
            if not lease or (revision, lease) == self._acked or revision == 0:
                continue
            try:
                await self._store().put(self.ack_key, encode_ack(revision), lease=lease)
            except StoreError as exc:
                self.ack_errors += 1
                log.debug("%s: cannot ack revision %d: %s", self.key, revision, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                self._ack_due.set()
                continue
            delay = 0.05
            self.acks += 1
            self._acked = (revision, lease)
            if self._seen_revision > revision:
                self._ack_due.set()  # newer revisions came while this one was written


def make_view(
    mode: str,
    store: Store,
    key: str,
    item: StateItem,
    initial: Any,
    *,
    poll_interval: float = 0.1,
    on_change: Callable[[Any], None] | None = None,
    ttl: float = 3.0,
    ack_key: str = "",
) -> View:
    """The view for a spec's consistency mode ('local', 'poll', 'watch', 'strong', 'fenced').

    `ttl` (the member lease's) and `ack_key` are the fenced view's."""
    if mode == "local":
        return LocalView(store, key, item, initial, on_change=on_change)
    if mode == "poll":
        return PollView(store, key, item, initial, interval=poll_interval, on_change=on_change)
    if mode == "watch":
        return WatchView(store, key, item, initial, on_change=on_change)
    if mode == "strong":
        return StrongView(store, key, item, initial, on_change=on_change)
    if mode == "fenced":
        if item.closed is None or not ack_key:
            raise ValueError(f"{item.name} cannot be fenced (it has no closed value or ack key)")
        return FencedView(store, key, item, initial, ttl=ttl, ack_key=ack_key, on_change=on_change)
    raise ValueError(
        f"unknown consistency mode {mode!r} (use local, poll, watch, strong or fenced)"
    )
