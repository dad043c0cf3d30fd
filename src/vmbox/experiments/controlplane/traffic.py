"""The control-plane experiment's traffic: seeded sources, their flows, and where each lands (pure).

Called by points.py (which model each point uses), by worker.py's feeder (the
flows a worker feeds, and when each packet is due) and by its unit test. No
I/O and no clock: times are passed in.

A service's sources follow a skewed (Zipf-like) law, as real clients do: a
few heavy sources offer 2-3 times the per-source limit (one of them over a
single flow, the case the demand split exists for), and many light ones offer
a fraction of it, the heaviest light one `light_top` of the limit and the
k-th `light_top / k**zipf`. Each source's packets are spread over a few flows
(its own source ports), and each flow is pinned to one replica by a hash of
the flow, as the kernel's SO_REUSEPORT spreads flows, not sources. A flow
sends at an even pace from a seeded phase, so the whole model (and what each
worker feeds) is the same from run to run.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, replace

BASE_PORT = 10_000  # a source's flows use BASE_PORT, BASE_PORT + 1, ...


@dataclass(frozen=True)
class Source:
    """One client address of a service: its offered rate (packets/s) over `flows` flows."""

    index: int
    rate: float
    flows: int
    heavy: bool

    @property
    def address(self) -> str:
        return source_address(self.index)


@dataclass(frozen=True)
class Flow:
    """One flow of one source of one service, pinned to one of the service's replicas."""

    service: int  # the service's index in the point
    source: int  # the source's index in its service
    port: int  # its source port
    rate: float  # packets/s
    phase: float  # in [0, 1): how far into its first period its first packet falls
    replica: int  # the index of the replica its packets reach

    def due(self, start: float, now: float) -> int:
        """Packets due from `start` to `now`: the k-th at start + (k + phase) / rate."""
        if now < start or self.rate <= 0:
            return 0
        return max(0, math.floor((now - start) * self.rate - self.phase) + 1)

    def at(self, start: float, k: int) -> float:
        """When packet `k` (from 0) of this flow is due."""
        return start + (k + self.phase) / self.rate


@dataclass(frozen=True)
class TrafficModel:
    """The sources of one service, in units of its per-source limit."""

    limit: int  # the per-source limit, packets per window (1 s)
    heavy: tuple[tuple[float, int], ...]  # per heavy source: (its rate / limit, its flows)
    light: int  # light sources
    light_top: float  # the heaviest light source's rate / limit
    zipf: float  # the light sources' exponent
    light_flows: int  # a light source uses 1 to light_flows flows (seeded)
    seed: int = 18

    def sources(self) -> list[Source]:
        """Heavy sources first (index 0 is the heaviest), then the light ones, lightest last."""
        rng = random.Random(self.seed)
        out = [
            Source(i, factor * self.limit, flows, True)
            for i, (factor, flows) in enumerate(self.heavy)
        ]
        first = len(out)
        for k in range(1, self.light + 1):
            rate = self.light_top * self.limit / k**self.zipf
            out.append(Source(first + k - 1, rate, rng.randint(1, self.light_flows), False))
        return out

    def rate(self) -> float:
        """Packets/s the service is offered, all sources together."""
        return sum(source.rate for source in self.sources())

    def flows(self, service: int, replicas: int) -> list[Flow]:
        """Every flow of the service, each pinned to one of `replicas` replicas."""
        rng = random.Random(f"{self.seed}/{service}")
        out = []
        for source in self.sources():
            each = source.rate / source.flows
            for f in range(source.flows):
                port = BASE_PORT + f
                where = pin(service, source.index, port, replicas)
                out.append(Flow(service, source.index, port, each, rng.random(), where))
        return out


def source_address(index: int) -> str:
    """The index-th source: 10.0.0.1, 10.0.0.2, ... (no .0 or .255 octets)."""
    high, rest = divmod(index, 254 * 254)
    return f"10.{high}.{rest // 254 + 1}.{rest % 254 + 1}"


def pin(service: int, source: int, port: int, replicas: int) -> int:
    """The replica a flow lands on: a hash of the flow modulo the replica count."""
    return zlib.crc32(f"{service}/{source}/{port}".encode()) % replicas


def fitted(model: TrafficModel, budget: float) -> TrafficModel:
    """`model` made to offer at most `budget` packets/s: a lower limit (the sources'
    rates follow it), then, at a limit of 1, fewer light sources, then fewer heavy ones.

    The shape stays: heavy sources still offer their multiple of the limit."""
    rate = model.rate()
    if rate <= budget:
        return model
    limit = max(1, math.floor(model.limit * budget / rate))
    smaller = replace(model, limit=limit)
    while smaller.rate() > budget and smaller.light > 0:
        smaller = replace(smaller, light=smaller.light - 1)
    while smaller.rate() > budget and len(smaller.heavy) > 1:
        smaller = replace(smaller, heavy=smaller.heavy[:-1])
    return smaller
