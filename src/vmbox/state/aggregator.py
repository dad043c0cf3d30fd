"""The service's aggregator: one replica, elected on its member lease, summarises for all.

vmbox.replica runs one `Aggregation` per replica. Each follows the service's
summary prefix (/vmbox/<service>/summary/, one watch) and hands every newer
summary on: the demand summary to the demand split, the ack summary to the
resize guard (formats and why they are enough: vmbox.state.summary). Each also
stands for election: while `summary/leader` is absent, it creates it on its
member lease (a compare-and-swap on absence, so one wins). The replica whose
key it is, on its current lease, leads:

- it watches every replica's ack (`acks/`) and publishes the complete sets
  whenever they change (a resize: a write or two, not one per ack);
- under `split: demand` it watches every replica's report (`demand/`) and
  publishes the heaviest of them once per report interval when they changed,
  a quarter interval after the reports (which are written half an interval
  off the windows' boundaries), each summary named by its tick. The tick
  a window divides by (the last one at least an interval before it begins,
  vmbox.sharing.window_tick) is written even when nothing changed, and made
  up for at the next tick if the loop missed it: a replica that begins the
  window without it waits for it (vmbox.functions.fixedwindow).

Its summaries live on its lease too: a leader that dies takes them and its
key with it when the lease expires (at once when the controller revokes the
lease of a replica that exited), and the next replica to see the key gone is
elected, within one lease TTL of the death. Meanwhile every replica keeps
the summaries it has: shares stay those of the last demand summary (they
add up to the limit; the fail policy covers a store that is away), and a
guard that waits for acks stays up (the safe side) until the new leader
publishes. A leader that lost its lease without knowing (partitioned) can
write nothing more: its puts fail on the lost lease, and replicas ignore a
summary older than the one they took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from vmbox import sharing
from vmbox.state import keys
from vmbox.state.demand import Report
from vmbox.state.demandsync import each_tick, parsed_report
from vmbox.state.epoch import parse_ack
from vmbox.state.membership import latest_only, watch_snapshots
from vmbox.state.store import KeyValue, LeaseLost, Store, StoreError
from vmbox.state.summary import (
    MAX_PAIRS,
    AckSummary,
    DemandSummary,
    as_acks,
    complete_sets,
    encode_acks,
    encode_demand,
    heaviest,
    parse_acks,
    parse_demand,
)

log = logging.getLogger(__name__)

CAMPAIGN_CHECK = 0.25  # seconds between looks at the leader key when no watch event comes


class Aggregation:
    """One replica's part: follow the summaries, stand for election, lead when elected."""

    def __init__(
        self,
        store: Store,
        service: str,
        replica_id: str,
        lease: Callable[[], int],
        *,
        on_acks: Callable[[dict[str, frozenset[str]], dict[str, int]], None],
        on_demand: Callable[[dict[str, Report], int | None], None] | None = None,
        interval: float = 0.1,
        window: float = 1.0,
        max_pairs: int = MAX_PAIRS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.service = service
        self.me = replica_id
        self.lease = lease
        self.on_acks = on_acks
        self.on_demand = on_demand  # None: the service does not split by demand
        self.interval = interval
        self.window = window  # the rate limit's: the tick each window divides by is always written
        self.max_pairs = max_pairs
        self.clock = clock
        self.leader_key = keys.summary_key(service, "leader")
        self.leader: tuple[str, int] | None = None  # (replica, lease) holding the key
        self.acks_revision = -1  # of the last summary taken
        self.demand_revision = (-1, -1)  # (revision, tick) of the last demand summary taken
        self.elections_won = 0
        self.summaries_written = 0
        self.summary_errors = 0
        self._leading: asyncio.Task[None] | None = None
        self._lost = 0  # a lease a summary write found gone: not ours to lead on any more
        self._look = asyncio.Event()

    @property
    def leading(self) -> bool:
        return self._leading is not None and not self._leading.done()

    async def run(self) -> None:
        """Until cancelled; never raises StoreError."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._follow())
                tasks.create_task(self._campaign())
        finally:
            await self._stop_leading()

    # -- every replica ---------------------------------------------------------

    async def _follow(self) -> None:
        prefix = keys.summary_prefix(self.service)
        async for _, values in watch_snapshots(self.store, prefix, _raw):
            self.leader = _leader(values.get("leader"))
            self._look.set()
            acks = values.get("acks")
            summary = parse_acks(acks.value) if acks is not None else None
            if summary is not None and summary.revision > self.acks_revision:
                self.acks_revision = summary.revision
                self.on_acks(*as_acks(summary))
            demand = values.get("demand")
            if self.on_demand is None or demand is None:
                continue
            taken = parse_demand(demand.value)
            # The same reports again under a later tick (a window's tick is written
            # even when nothing changed) are news too: the window waits for them.
            if taken is None:
                continue
            order = (taken.revision, -1 if taken.tick is None else taken.tick)
            if order > self.demand_revision:
                self.demand_revision = order
                self.on_demand(taken.reports, taken.tick)

    async def _campaign(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CAMPAIGN_CHECK):
                    await self._look.wait()
            self._look.clear()
            lease = self.lease()
            if self.leader is None and lease and lease != self._lost:
                value = json.dumps({"replica": self.me, "lease": lease}).encode()
                with contextlib.suppress(StoreError):
                    if await self.store.compare_and_swap(self.leader_key, None, value, lease=lease):
                        self.leader = (self.me, lease)
                        self.elections_won += 1
                        log.info("replica %s aggregates for %s", self.me, self.service)
            mine = lease not in (0, self._lost) and self.leader == (self.me, lease)
            if mine and not self.leading:
                self._leading = asyncio.create_task(self._lead(lease))
            elif not mine and self._leading is not None:
                await self._stop_leading()

    async def _stop_leading(self) -> None:
        task, self._leading = self._leading, None
        if task is not None:
            task.cancel()
            # wait, not `await task`: a cancellation of this caller must not be taken
            # for the leading task's own and swallowed.
            await asyncio.wait({task})

    # -- the leader -----------------------------------------------------------

    async def _lead(self, lease: int) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._summarise_acks(lease))
                if self.on_demand is not None:
                    tasks.create_task(self._summarise_demand(lease))
        except* LeaseLost:
            self._lost = lease
            self._look.set()  # the lease is gone: the key with it; look again

    async def _write(self, name: str, value: bytes, lease: int) -> bool:
        try:
            await self.store.put(keys.summary_key(self.service, name), value, lease=lease)
        except LeaseLost:
            raise
        except StoreError as exc:
            self.summary_errors += 1
            log.debug("summary %s of %s not written: %s", name, self.service, exc)
            return False
        self.summaries_written += 1
        return True

    async def _summarise_acks(self, lease: int) -> None:
        written: tuple[tuple[frozenset[str], int | None], ...] | None = None
        # Only the newest snapshot when the writes fall behind: a join of N replicas
        # makes about N^2 ack events, and each look costs O(N).
        snapshots = watch_snapshots(self.store, keys.acks_prefix(self.service), parse_ack)
        async with contextlib.aclosing(latest_only(snapshots)) as newest:
            async for revision, acks in newest:
                complete = complete_sets(acks)
                if complete != written and await self._write(
                    "acks", encode_acks(AckSummary(revision, complete)), lease
                ):
                    written = complete

    async def _summarise_demand(self, lease: int) -> None:
        latest: tuple[int, dict[str, Report]] = (0, {})
        written: dict[str, Report] | None = None
        last = -1  # the tick last written

        async def follow() -> None:
            nonlocal latest
            prefix = keys.demand_prefix(self.service)
            async for revision, reports in watch_snapshots(self.store, prefix, parsed_report):
                latest = (revision, reports)

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(follow())
            # A quarter interval after the reports (written half an interval off the
            # windows' boundaries), a quarter before the next boundary.
            async for tick in each_tick(self.interval, sharing.SUMMARY_PHASE, self.clock):
                revision, reports = latest
                if not revision:
                    continue
                cut = heaviest(reports, self.max_pairs)
                # The tick a window divides by is written even if nothing changed, and
                # one a late loop skipped is made up for at once, so a replica that has
                # no summary of that tick yet knows one is coming.
                due = sharing.owed_tick(tick, self.window, self.interval)
                if (cut != written or last < due) and await self._write(
                    "demand", encode_demand(DemandSummary(revision, cut, tick)), lease
                ):
                    written, last = cut, tick

    def gauges(self) -> dict[str, float]:
        return {
            "aggregator_leading": float(self.leading),
            "aggregator_elections_won": float(self.elections_won),
            "aggregator_summaries_written": float(self.summaries_written),
            "aggregator_summary_errors": float(self.summary_errors),
        }


def _raw(kv: KeyValue) -> KeyValue:
    return kv


def _leader(kv: KeyValue | None) -> tuple[str, int] | None:
    """Who holds the leader key and on which lease (its value says: a watch event does
    not carry the lease); None when absent. A value that does not parse still holds
    the key (someone wrote it by hand): nobody leads until it goes."""
    if kv is None:
        return None
    try:
        data = json.loads(kv.value)
        replica, lease = data["replica"], data["lease"]
    except (ValueError, TypeError, KeyError):
        return ("", 0)
    if not isinstance(replica, str) or not isinstance(lease, int):
        return ("", 0)
    return (replica, lease)
