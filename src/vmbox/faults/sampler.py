"""The replicas while a fault runs: their memory and metrics, sampled, and whether they survived.

Called by the fault modules: `async with ReplicaSampler(service) as sampler:`
around the injection, then `finish` fills in the fault's row from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Self

import psutil

from vmbox.faults import FaultResult, processes
from vmbox.faults.snapshot import state_lost
from vmbox.metrics import ScrapeError, scrape
from vmbox.state.membership import list_members
from vmbox.testbed import Service

MIB = 1024 * 1024


class ReplicaSampler:
    """Samples the replicas' RSS and metrics while a fault runs; tells whether they survived.

    A replica survived when the process that was serving at the start still
    runs (same pid, same start time) and the controller restarted nothing.
    """

    def __init__(
        self, service: Service, rss_every: float = 0.05, scrape_every: float = 0.2
    ) -> None:
        self.service = service
        self.rss_every = rss_every
        self.scrape_every = scrape_every
        self.procs: dict[str, psutil.Process] = {}
        self.metrics: dict[str, str] = {}
        self.idle_rss = 0  # the highest replica RSS before the fault
        self.peak_rss = 0
        self.highest: dict[str, float] = {}  # metric -> highest value any replica showed
        self.last: dict[str, dict[str, float]] = {}  # replica -> its latest scrape
        self.gone: list[str] = []  # what dead() said when the sampling ended
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        members = await list_members(self.service.store, self.service.spec.service)
        for rid, member in members.items():
            self.procs[rid] = psutil.Process(int(member.info["pid"]))
            self.metrics[rid] = str(member.info["metrics"])
        self.idle_rss = self.peak_rss = self._rss()
        await self.scrape()
        self._tasks = [
            asyncio.create_task(self._sampling()),
            asyncio.create_task(self._scraping()),
        ]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sample_rss()
        await self.scrape()
        self.gone = self.dead()

    def _rss(self) -> int:
        total = 0
        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                total = max(total, proc.memory_info().rss)
        return total

    def _sample_rss(self) -> None:
        self.peak_rss = max(self.peak_rss, self._rss())

    async def _sampling(self) -> None:
        while True:
            await asyncio.sleep(self.rss_every)
            self._sample_rss()

    async def _scraping(self) -> None:
        while True:
            await asyncio.sleep(self.scrape_every)
            await self.scrape()

    async def scrape(self) -> None:
        """Read every replica's metrics now, keeping the highest of each."""
        for rid, address in self.metrics.items():
            with contextlib.suppress(ScrapeError):
                values = await scrape(address)
                self.last[rid] = values
                for name, value in values.items():
                    self.highest[name] = max(self.highest.get(name, value), value)

    async def settled(self, name: str, within: float, every: float = 0.25) -> float:
        """Scrape until `total(name)` stops moving (the replicas worked through what the
        kernel queued for them) or `within` seconds pass; that total."""
        deadline = time.monotonic() + within
        await self.scrape()
        last = self.total(name)
        while time.monotonic() < deadline:
            await asyncio.sleep(every)
            await self.scrape()
            now = self.total(name)
            if now == last:
                return now
            last = now
        return last

    def total(self, name: str) -> float:
        """A metric summed over the replicas' latest scrapes."""
        return sum(values.get(name, 0.0) for values in self.last.values())

    async def until_every(
        self, test: Callable[[dict[str, float]], bool], within: float
    ) -> float | None:
        """Scrape until every replica's metrics pass `test`: the seconds it took, or None."""
        started = time.monotonic()
        while True:
            await self.scrape()
            if len(self.last) == len(self.metrics) and all(map(test, self.last.values())):
                return time.monotonic() - started
            if time.monotonic() - started > within:
                return None
            await asyncio.sleep(0.05)

    def dead(self) -> list[str]:
        """Replicas whose original process is gone, and restarts, one line each."""
        gone = [
            f"replica {rid} (pid {proc.pid}) died"
            for rid, proc in self.procs.items()
            if not processes.alive(proc)
        ]
        if self.service.controller.restarts:
            gone.append(f"the controller restarted {self.service.controller.restarts} replica(s)")
        return gone


def finish(
    result: FaultResult,
    sampler: ReplicaSampler,
    before: Mapping[str, bytes],
    after: Mapping[str, bytes],
    written: Mapping[str, bytes] = {},
) -> FaultResult:
    """Fill in survival, state lost and peak memory from a fault's sampler and snapshots."""
    result.survived = not sampler.gone and result.survived
    result.problems.extend(sampler.gone)
    result.state_lost = state_lost(before, after, written)
    result.peak_rss = sampler.peak_rss
    return result
