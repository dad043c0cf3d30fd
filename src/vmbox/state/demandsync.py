"""Demand reports for the `demand` split: publish this replica's, follow the group's.

The asyncio layer over vmbox.state.demand (the report format, pure).
vmbox.replica runs one `DemandSharing` per replica when the spec says
`split: demand`. Every `report_interval` (aligned to the epoch, so all
replicas report the same slices of time, and half an interval off the rate
limit's windows) the `DemandReporter` takes the packets each source offered
the middlebox since the last report, keeps the heaviest
`report_max_sources`, and writes them as one compact JSON object to
/vmbox/<service>/demand/<replica> on the replica's membership lease: a replica
that dies or leaves takes its report with it. That is one write per replica
per interval whatever the number of sources, and none while the report is the
same as the last one (an idle replica writes `{}` once).

The group's reports reach the middlebox through `DemandSharing.take`: from
the service's aggregator (vmbox.state.aggregator, the default: one summary
key per interval), or, with `follow` (the protocol before the aggregator,
kept for the control-plane simulation's comparison), from this replica's own
`watch_demand` of the prefix (re-listing after store errors, like
`watch_members`). Either way the middlebox gets snapshots, replica -> source
-> packets, and re-divides the sources whose counts changed. A report of an
unchanged replica is the same object from one snapshot to the next, so the
middlebox can tell what changed cheaply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping

from vmbox import sharing
from vmbox.state import keys
from vmbox.state.demand import DemandAware, Report, encode_report, parse_report
from vmbox.state.store import KeyValue, LeaseLost, Store, StoreError

log = logging.getLogger("vmbox.state.demand")  # the logger name operators know


async def each_tick(
    interval: float, phase: float, clock: Callable[[], float]
) -> AsyncGenerator[int, None]:
    """The ticks at (i + phase) * interval from now on (vmbox.sharing.tick_time), each
    once and none before its time: a timer may fire a little early (asyncio allows its
    clock's resolution), and a second pass through a tick would make a report (or a
    summary) of a few milliseconds, whose near-empty counts pass for a source's demand.
    A tick the caller's loop was too late for is skipped, not caught up."""
    tick = -1
    while True:
        tick = max(tick + 1, sharing.next_tick(clock(), interval, phase))
        due = sharing.tick_time(tick, interval, phase)
        while (wait := due - clock()) > 0:
            await asyncio.sleep(wait)
        yield tick


class DemandReporter:
    """Writes this replica's demand report once per interval, on the membership lease."""

    def __init__(
        self,
        store: Store,
        service: str,
        replica_id: str,
        collect: Callable[[], Mapping[str, int]],
        lease: Callable[[], int],
        *,
        interval: float = 0.1,
        max_sources: int = 256,
        clock: Callable[[], float] = time.time,
        gather: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.key = keys.demand_key(service, replica_id)
        self.collect = collect
        self.gather = gather  # brings the counts `collect` takes up to date (enforce: kernel)
        self.lease = lease
        self.interval = interval
        self.max_sources = max_sources
        self.clock = clock
        self.writes = 0
        self.last_error: str | None = None
        self._written: tuple[int, bytes] | None = None  # (lease, report) last stored

    async def run(self) -> None:
        """Report every interval until cancelled; never raises StoreError."""
        async for _ in each_tick(self.interval, sharing.REPORT_PHASE, self.clock):
            await self.report()

    async def report(self) -> bool:
        """Collect and write one report; False when skipped (unchanged, no lease, store away)."""
        if self.gather is not None:
            await self.gather()
        value = encode_report(self.collect(), self.max_sources)
        lease = self.lease()
        if not lease or self._written == (lease, value):
            return False
        try:
            await self.store.put(self.key, value, lease=lease)
        except LeaseLost:
            return False  # the membership registers again; the next report uses its lease
        except StoreError as exc:
            if self.last_error is None:
                log.warning("demand report %s not written: %s (retrying)", self.key, exc)
            self.last_error = str(exc)
            return False
        if self.last_error is not None:
            log.info("demand report %s written again", self.key)
            self.last_error = None
        self._written = (lease, value)
        self.writes += 1
        return True


def _parsed(key: str, raw: bytes) -> Report:
    report = parse_report(raw)
    if report is None:
        log.warning("ignoring a demand report that does not parse at %s: %r", key, raw[:60])
        return {}
    return report


def parsed_report(kv: KeyValue) -> Report:
    """The report at `kv`, or an empty one (logged) if it does not parse."""
    return _parsed(kv.key, kv.value)


async def watch_demand(
    store: Store, service: str, *, retry: float = 0.5
) -> AsyncIterator[dict[str, Report]]:
    """A snapshot of every replica's report first, then one after each change, forever.

    Store errors never end the iteration: it re-lists and watches again from
    the listing's revision. Unchanged reports keep their identity.
    """
    prefix = keys.demand_prefix(service)
    reports: dict[str, Report] = {}
    while True:
        try:
            kvs, revision = await store.get_prefix(prefix)
            listed = {keys.last_segment(kv.key): _parsed(kv.key, kv.value) for kv in kvs}
            # Keep the objects of reports that did not change while we were away.
            reports = {r: reports[r] if reports.get(r) == v else v for r, v in listed.items()}
            yield dict(reports)
            async for event in store.watch_prefix(prefix, revision + 1):
                replica = keys.last_segment(event.key)
                if event.kind == "delete":
                    reports.pop(replica, None)
                else:
                    reports[replica] = _parsed(event.key, event.value)
                yield dict(reports)
        except StoreError as exc:
            log.debug("demand watch of %s interrupted: %s", service, exc)
        await asyncio.sleep(retry)


class DemandSharing:
    """One replica's side of the demand split: its reporter and its watch of the others."""

    def __init__(
        self,
        store: Store,
        service: str,
        replica_id: str,
        middlebox: DemandAware,
        lease: Callable[[], int],
        *,
        interval: float,
        max_sources: int,
        gather: Callable[[], Awaitable[None]] | None = None,
        on_snapshot: Callable[[], None] | None = None,
        follow: bool = True,
    ) -> None:
        self.store = store
        # Watch every replica's report here (the protocol before the aggregator: N^2
        # watch events); False: the aggregator's summary comes through `take`.
        self.follow = follow
        self.service = service
        self.middlebox = middlebox
        self.reporter = DemandReporter(
            store,
            service,
            replica_id,
            middlebox.take_demand,
            lease,
            interval=interval,
            max_sources=max_sources,
            gather=gather,
        )
        self.on_snapshot = on_snapshot  # after the middlebox took each snapshot
        self.snapshots = 0
        if not follow:
            # Summaries come named by their tick: until the first, a window waits a
            # little for it, then divides by no report (the even share) like everyone.
            middlebox.set_demand({}, -1)

    async def run(self) -> None:
        """Report and follow until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.reporter.run())
            if self.follow:
                group.create_task(self._follow())

    async def _follow(self) -> None:
        async for reports in watch_demand(self.store, self.service):
            self.take(reports)

    def take(self, reports: Mapping[str, Report], tick: int | None = None) -> None:
        """A new snapshot of the group's reports: its own watch's (no tick: it applies
        at once), or the aggregator's, named by the summary tick it was written for."""
        self.middlebox.set_demand(reports, tick)
        self.snapshots += 1
        if self.on_snapshot is not None:
            self.on_snapshot()

    def gauges(self) -> dict[str, float]:
        return {"demand_report_writes": float(self.reporter.writes)}
