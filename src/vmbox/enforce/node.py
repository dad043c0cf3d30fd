"""The replica's driver under `enforce: kernel`: its node's table follows its shares.

vmbox.replica runs this in place of a packet loop. The replica still joins the
group, follows the resize guard, the limits and the fail policy; whenever any
of them changes it calls `changed()` (or `fail()`), and one task here brings
the node's table (vmbox.enforce.kernel, in the node's namespace) to what they
say, one nft transaction at a time:

- normal: the table at `rates()` (vmbox.enforce.rates: each ratelimit rule at
  the share its limiter holds now) and, under `split: demand`, `sources()`
  (each source with a share of its own, settled by `settle_sources` so a share
  that wobbles does not restart its bucket); a change is one `set_rates`
  transaction, made only when a rate differs from the one in force;
- fail policy `closed` (the store away): the table installed closed, every
  packet it sees counted and dropped;
- fail policy `open`: the table removed, the node forwards everything;
- back from either: the table installed again at the current rates.

`split: demand`: the demand reporter calls `gather()` before each report:
one read of the whole table, and what each source offered since the last one
goes to `on_offered` (the limiter's demand count, which the report takes).

The table carries a dead man's switch (`alive_for`: 2 lease TTLs): installed
with a deadline that the same task renews RENEWALS times per span, after
which the kernel drops everything the table sees; so a table whose replica
died and whose place nobody holds closes itself (DESIGN.md "Kernel
enforcement").

The same task reads the table's counters every `read_interval` seconds and
keeps them as monotonic totals across re-installs (`totals`, `rule_counters`:
what the replica's metrics export). An nft call that fails is logged and
tried again at the next change or read: the table keeps enforcing what it
had (the kernel needs no process to go on). `start()` fails with one line
(EnforceError) when nft is missing, NodeGone when the node namespace is; a
namespace that vanishes under a running table calls `on_gone` (the replica
then leaves: no traffic crosses a node that is gone, so its share is free).

Leaving: the replica's share drops to 0 before its lease goes (the guard's
`leaving`), and `stop(close=True)` writes that last: the node then drops what
its rules match until the table is removed, so a node left in the route admits
nothing the other nodes' larger shares do not account for. A replica killed
outright leaves its table at its last rates: safe for as long as the others'
shares still count it (docs/nftables-rates.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from vmbox import netns
from vmbox.enforce.kernel import EnforceError, KernelEnforcer, Reading, SourceRates
from vmbox.enforce.nftables import Count, Rate
from vmbox.enforce.rates import closed_rates, settle_sources
from vmbox.packet import Verdict

log = logging.getLogger(__name__)

READ_INTERVAL = 1.0  # seconds between counter reads (one `nft list counters` each)
RETRY_PAUSE = 0.2  # seconds after an nft call failed, before the next try; doubling
RETRY_MAX = 5.0  # up to this while calls keep failing (nft missing, a namespace unwell)
RENEWALS = 4  # renewals of the dead man's switch within its span
ALIVE_TTLS = 2  # its span: this many member lease TTLs (DESIGN.md "Kernel enforcement")


def alive_for(lease_ttl: float) -> float:
    """How long a table enforces after its last renewal: ALIVE_TTLS lease TTLs, and at
    least 2 s (the switch counts whole seconds)."""
    return max(2.0, ALIVE_TTLS * lease_ttl)


TableState = Literal["absent", "enforcing", "closed", "removed"]


@dataclass
class Totals:
    """What the node's table counted since the driver started, across re-installs."""

    seen: Count = field(default_factory=Count)
    dropped: Count = field(default_factory=Count)
    rules: dict[str, dict[str, int]] = field(default_factory=dict)

    def plus(self, reading: Reading) -> Totals:
        rules = {name: dict(values) for name, values in self.rules.items()}
        for name, values in reading.rules.items():
            mine = rules.setdefault(name, {})
            for key, value in values.items():
                mine[key] = mine.get(key, 0) + value
        return Totals(_add(self.seen, reading.seen), _add(self.dropped, reading.dropped), rules)


def _shown(rates: Mapping[str, Rate]) -> str:
    return ", ".join(f"{name} {r.amount}/{r.per}" for name, r in sorted(rates.items()))


def _add(a: Count, b: Count) -> Count:
    return Count(a.packets + b.packets, a.bytes + b.bytes)


class NodeGone(EnforceError):
    """The node's namespace is not there (never built, or deleted): a restart may find it."""


class NodeDriver:
    """One replica's table in its node: applied on change, read on a timer."""

    def __init__(
        self,
        enforcer: KernelEnforcer,
        rates: Callable[[], Mapping[str, Rate]],
        *,
        read_interval: float = READ_INTERVAL,
        on_reading: Callable[[NodeDriver], None] | None = None,
        on_gone: Callable[[NodeGone], None] | None = None,
        sources: Callable[[], SourceRates] | None = None,
        on_offered: Callable[[str, Mapping[str, int]], None] | None = None,
        alive_for: float | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.enforcer = enforcer
        self.rates = rates
        # The dead man's switch: the table drops everything alive_for seconds after the
        # last renewal (every alive_for / RENEWALS), unless a renewal moves it on.
        self.alive_for = alive_for
        self.wall = wall
        self.renewals = 0
        self.sources = sources  # split: demand's per-source rates
        self.on_offered = on_offered  # split: demand: rule, source -> offered since last
        self.applied_sources: dict[str, dict[str, Rate]] = {}
        self.source_updates = 0  # transactions that changed a source's own rate
        self.read_interval = read_interval
        self.on_reading = on_reading
        self.on_gone = on_gone  # the namespace vanished under a running table
        self.policy: Verdict | None = None  # the fail policy's answer while the store is away
        self.state: TableState = "absent"
        self.applied: dict[str, Rate] = {}
        self.transactions = 0  # nft transactions that changed the table
        self.errors = 0
        self._failing = 0  # nft steps failed in a row (the retry's backoff)
        self.last_reading: Reading | None = None
        self._carried = Totals()  # what earlier installs of the table counted
        # Readings come from the loop (read) and from a metrics scrape's thread
        # (read_blocking): kept under this lock, and one taken before the table was
        # replaced (`_installs` moved on) is dropped, or it would be counted twice.
        self._counted = threading.Lock()
        self._installs = 0
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one transaction at a time: generations count up

    @property
    def namespace(self) -> str:
        return self.enforcer.namespace

    @property
    def totals(self) -> Totals:
        with self._counted:
            reading, carried = self.last_reading, self._carried
        return carried if reading is None else carried.plus(reading)

    def rule_counters(self) -> dict[str, dict[str, int]]:
        """Per rule: matched, passed, dropped, shadow_dropped, overflow (for the metrics)."""
        return self.totals.rules

    def check(self) -> None:
        """NodeGone when the node's namespace does not exist."""
        if not netns.exists(self.namespace):
            raise NodeGone(
                f"node namespace {self.namespace!r} does not exist (vmbox lab up --nodes N?)"
            )

    async def start(self) -> None:
        """Install the table at the current rates and follow changes from here on."""
        self.check()
        await self.sync()
        self._task = asyncio.create_task(self._run())

    def changed(self) -> None:
        """The shares, a limit or the group changed: bring the table to them soon."""
        self._dirty.set()

    def fail(self, verdict: Verdict | None) -> None:
        """The fail policy's answer (DROP: closed, PASS: open), None when the store is back."""
        if verdict != self.policy:
            self.policy = verdict
            self.changed()

    async def sync(self) -> None:
        """One step toward what the policy and the rates say (at most one transaction)."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        rates = dict(self.rates())
        if self.policy is Verdict.PASS:
            if self.state in ("enforcing", "closed"):
                await self._replaced(self.enforcer.remove())
                self.state = "removed"
            return
        want: TableState = "closed" if self.policy is Verdict.DROP else "enforcing"
        sources = settle_sources(self.sources(), self.applied_sources) if self.sources else {}
        if self.state != want:
            if want == "closed":
                sources = {}
            await self._replaced(
                self.enforcer.install(
                    rates, closed=want == "closed", sources=sources, deadline=self.deadline()
                )
            )
            self.state, self.applied, self.applied_sources = want, rates, sources
            log.info(
                "%s in %s: table %s at %s",
                self.enforcer.table.name,
                self.namespace,
                want,
                _shown(rates),
            )
        elif rates != self.applied or sources != self.applied_sources:
            await self.enforcer.set_rates(rates if rates != self.applied else None, sources)
            self.transactions += 1
            if rates != self.applied:
                log.info(
                    "%s in %s: rates %s", self.enforcer.table.name, self.namespace, _shown(rates)
                )
            if sources != self.applied_sources:
                self.source_updates += 1
                log.debug(
                    "%s in %s: own rates %s", self.enforcer.table.name, self.namespace, sources
                )
            self.applied, self.applied_sources = rates, sources

    async def _replaced(self, step: Awaitable[None]) -> None:
        """Run a step that replaces or removes the table, keeping what it had counted."""
        with contextlib.suppress(EnforceError):
            await self.read()
        await step
        self.transactions += 1
        with self._counted:
            reading, self.last_reading = self.last_reading, None
            if reading is not None:
                self._carried = self._carried.plus(reading)
            self._installs += 1

    async def read(self) -> Reading | None:
        """The table's counters now (None when there is no table)."""
        if self.state not in ("enforcing", "closed"):
            return None
        installs = self._installs
        # The counters only (a short listing): what each source offered is gather()'s.
        return self._keep(await self.enforcer.read(sources=False), installs)

    async def gather(self) -> None:
        """split: demand: what each source offered since the last gather, to `on_offered`
        (one read of the whole table; nothing when there is no enforcing table, or nft
        failed: the report then says nothing of this node's sources for one interval)."""
        if self.on_offered is None:
            return
        async with self._lock:  # not across a transaction: the generation must hold still
            if self.state != "enforcing":
                return
            installs = self._installs
            try:
                reading = self._keep(await self.enforcer.read(sources=True), installs)
            except EnforceError as exc:
                self.errors += 1
                log.warning("%s in %s: %s", self.enforcer.table.name, self.namespace, exc)
                return
        if reading is None:
            return
        units = {rule.name: rule.unit for _, rule in self.enforcer.table.limited()}
        for rule, counts in reading.offered.items():
            in_bytes = units.get(rule) == "bytes"
            self.on_offered(
                rule, {src: c.bytes if in_bytes else c.packets for src, c in counts.items()}
            )

    def read_blocking(self) -> Reading | None:
        """The counters now, in the calling thread: a metrics scrape reads them fresh, so
        a rate taken between two scrapes is exact whatever their interval (read only
        every READ_INTERVAL, a 0.5 s sampler saw 0 and twice the rate in turn). None when
        there is no table, or nft failed (the last reading stands)."""
        if self.state not in ("enforcing", "closed"):
            return None
        installs = self._installs
        try:
            reading = self.enforcer.read_counters_blocking()
        except EnforceError as exc:
            log.debug("%s in %s: %s", self.enforcer.table.name, self.namespace, exc)
            return None
        return self._keep(reading, installs)

    def _keep(self, reading: Reading, installs: int) -> Reading | None:
        with self._counted:
            if installs != self._installs:
                return None  # the table was replaced meanwhile: this one is counted
            self.last_reading = reading
        if self.on_reading is not None:
            self.on_reading(self)
        return reading

    def deadline(self) -> int | None:
        """Where a renewal now puts the switch: alive_for from now, in whole Unix seconds
        (nftables' `meta time` resolution), rounded down: never later than promised."""
        if self.alive_for is None:
            return None
        return math.floor(self.wall() + self.alive_for)

    async def renew(self) -> None:
        """Move the dead man's switch on (nothing when there is no table, or no switch)."""
        deadline = self.deadline()
        if deadline is None:
            return
        async with self._lock:
            if self.state in ("enforcing", "closed"):
                await self.enforcer.renew(deadline)
                self.renewals += 1

    async def _run(self) -> None:
        now = time.monotonic()
        next_read = now + self.read_interval
        every = self.alive_for / RENEWALS if self.alive_for else math.inf
        next_renewal = now + every
        while True:
            wake = min(next_read, next_renewal)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake - time.monotonic())):
                    await self._dirty.wait()
            if self._dirty.is_set():
                self._dirty.clear()
                if not await self._logged(self.sync()):
                    self._dirty.set()  # the table is not what it should be: again, soon
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + every
                await self._logged(self.renew())
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + self.read_interval
                await self._logged(self.read())

    async def _logged(self, step: Awaitable[object]) -> bool:
        """Run one nft step; a failure is counted, then a pause (False) that doubles while
        steps keep failing. The first failure in a row is a warning, the rest debug lines,
        and the first success after them says how many there were."""
        try:
            await step
        except EnforceError as exc:
            self.errors += 1
            self._failing += 1
            level = logging.WARNING if self._failing == 1 else logging.DEBUG
            log.log(level, "%s in %s: %s", self.enforcer.table.name, self.namespace, exc)
            try:
                self.check()
            except NodeGone as gone:
                self.state = "absent"  # and its table with it
                if self.on_gone is not None:
                    self.on_gone(gone)
            await asyncio.sleep(min(RETRY_MAX, RETRY_PAUSE * 2 ** (self._failing - 1)))
            return False
        if self._failing:
            log.info(
                "%s in %s: nft works again after %d failed call(s)",
                self.enforcer.table.name,
                self.namespace,
                self._failing,
            )
            self._failing = 0
        return True

    async def stop(self, *, close: bool) -> None:
        """Stop following; `close` leaves the table at a share of 0 (a replica leaving)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        closed = closed_rates(self.enforcer.table)
        if close and self.state == "enforcing" and self.applied != closed:
            async with self._lock:
                with contextlib.suppress(EnforceError):
                    await self.enforcer.set_rates(closed)
                    self.applied = closed
                    self.transactions += 1
