"""What a worker watches in its replicas: limit changes applied, a resize settling, its loop's lag.

Called by worker.py. Each watcher reads the real Replica's state from the
same process (no metrics server: the replicas run headless):

- `record_limits` wraps each replica's `limit` view's on_change, so the
  moment a new value is applied is recorded where it happens;
- `SettleWatch` samples the resized service's replicas every 10 ms from the
  resize on: each must see the new member count and hold its share (its
  resize guard down, registered); the resize has settled here from the
  first sample after the last one that found one of them short;
- `LoopLag` measures how late the loop wakes a 20 ms sleep: a simulation
  whose loop runs late is itself the bottleneck, not etcd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

SETTLE_TICK = 0.01
LAG_TICK = 0.02


class _View(Protocol):
    on_change: Callable[[Any], None] | None


class Watched(Protocol):
    """What the watchers read of a vmbox.replica.Replica."""

    replica_id: str
    views: Any
    members: int
    guard: Any  # its ResizeGuard: `guarded`

    @property
    def holding_share(self) -> bool: ...


def record_limits(
    replicas: Iterable[tuple[tuple[int, int], Watched]],
    into: list[list[float]],
    clock: Callable[[], float] = time.time,
) -> None:
    """Append [service, replica, time, value] to `into` whenever a replica applies a new limit."""
    for (service, index), replica in replicas:
        view: _View | None = replica.views.get("limit")
        if view is None:
            continue
        inner = view.on_change

        def applied(
            value: Any,
            inner: Callable[[Any], None] | None = inner,
            s: int = service,
            r: int = index,
        ) -> None:
            into.append([s, r, clock(), float(value)])
            if inner is not None:
                inner(value)

        view.on_change = applied


class SettleWatch:
    """Whether the replicas of a resized service here all see `target` members and hold
    their share; `settled_at` is when that last became (and stayed) true."""

    def __init__(
        self,
        replicas: Callable[[], list[Watched]],
        target: int,
        on_settled: Callable[[float], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.replicas = replicas
        self.target = target
        self.on_settled = on_settled
        self.clock = clock
        self.settled_at: float | None = None
        self.told = False

    def look(self) -> None:
        now = self.clock()
        ok = all(r.holding_share and r.members == self.target for r in self.replicas())
        if not ok:
            self.settled_at = None
        elif self.settled_at is None:
            self.settled_at = now
            if not self.told:
                self.told = True
                self.on_settled(now)

    async def run(self) -> None:
        while True:
            self.look()
            await asyncio.sleep(SETTLE_TICK)

    def state(self) -> dict[str, list[Any]]:
        """Each watched replica now: [holds its share, members, guarded, the members of
        its view that acked that view]."""
        out = {}
        for r in self.replicas():
            view = frozenset(r.guard.view)
            acked = sum(r.guard.acks.get(m) == view for m in view)
            out[r.replica_id] = [r.holding_share, r.members, bool(r.guard.guarded), acked]
        return out


class LoopLag:
    """How late the loop wakes from a short sleep, sampled all along."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.samples: list[tuple[float, float]] = []  # (wall time, lag in s)

    async def run(self) -> None:
        while True:
            before = self.clock()
            await asyncio.sleep(LAG_TICK)
            self.samples.append((time.time(), max(0.0, self.clock() - before - LAG_TICK)))

    def within(self, start: float, end: float) -> dict[str, float]:
        """p50, p95 and max of the lags sampled between `start` and `end` (wall time)."""
        lags = sorted(lag for at, lag in self.samples if start <= at <= end)
        if not lags:
            return {}

        def rank(p: float) -> float:
            return lags[min(len(lags) - 1, int(p * len(lags)))]

        return {"p50": rank(0.5), "p95": rank(0.95), "max": lags[-1]}
