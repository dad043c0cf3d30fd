"""A worker's share of the traffic: each flow's packets into its replica's `decide`, counted.

Called by worker.py, one Feeder per worker process. The flows (traffic.py)
are the ones pinned to this worker's replicas; each packet is decided when it
is due, with the wall-clock time as `now` (as a relay does), and counted by
source and window as a server behind the replicas would count what passed:
run.py sums the workers' counts, so a source spread over replicas in several
workers is judged as one.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from vmbox.experiments.controlplane.traffic import Flow, source_address
from vmbox.packet import Packet, Verdict

TICK = 0.005  # seconds between looks at what is due
BATCH = 5000  # packets decided at most before the loop gets a turn


class Decides(Protocol):
    def decide(self, packet: Packet, now: float) -> Verdict: ...


class Feeder:
    """Packets of `flows` into the replicas they are pinned to, from `start` on."""

    def __init__(
        self,
        flows: list[Flow],
        replicas: Mapping[tuple[int, int], Decides],
        start: float,
        *,
        window: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.flows = [f for f in flows if (f.service, f.replica) in replicas]
        self.targets = [replicas[(f.service, f.replica)] for f in self.flows]
        self.packets = [Packet(source_address(f.source), f.port, 64) for f in self.flows]
        self.start = start
        self.window = window
        self.clock = clock
        self._due = [(f.at(start, 0), i, 0) for i, f in enumerate(self.flows)]
        heapq.heapify(self._due)
        # (service, source, window) -> [offered, passed]
        self.counts: dict[tuple[int, int, int], list[int]] = {}
        self.fed = 0

    def feed(self, now: float) -> int:
        """Decide every packet due by `now` (at most BATCH); how many it decided."""
        done = 0
        due, flows, counts = self._due, self.flows, self.counts
        while due and due[0][0] <= now and done < BATCH:
            _, i, k = heapq.heappop(due)
            flow = flows[i]
            verdict = self.targets[i].decide(self.packets[i], now)
            key = (flow.service, flow.source, int(now // self.window))
            seen = counts.get(key)
            if seen is None:
                seen = counts[key] = [0, 0]
            seen[0] += 1
            seen[1] += verdict is Verdict.PASS
            heapq.heappush(due, (flow.at(self.start, k + 1), i, k + 1))
            done += 1
        self.fed += done
        return done

    async def run(self) -> None:
        """Feed until cancelled."""
        await asyncio.sleep(max(0.0, self.start - self.clock()))
        while True:
            if self.feed(self.clock()) < BATCH:
                await asyncio.sleep(TICK)
            else:
                await asyncio.sleep(0)

    def rows(self) -> list[list[int]]:
        """[service, source, window, offered, passed] for every source and window fed."""
        return [[*key, *value] for key, value in sorted(self.counts.items())]
