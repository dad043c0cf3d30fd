"""The pure part of the load generator: a load plan and its send schedule.

vmbox.tools.load sends by this schedule; tests check its math without
sockets. A plan is a constant `rate` or a `ramp` (from, to, step per second);
packet k is due when the integral of the per-second rate reaches k, so the
sender follows an absolute timetable and never drifts.
"""

from __future__ import annotations

import bisect
import math
import struct
from dataclasses import dataclass

Address = tuple[str, int]
HEADER = struct.Struct("!QQ")  # sequence number, send time (perf_counter_ns)
SLACK = 16  # packets allowed above ceil(max rate * duration)
MAX_FLOWS = 4096  # one socket each: keep well under the fd limit


@dataclass(frozen=True)
class LoadPlan:
    """What to send: a constant `rate` or a `ramp` (from, to, step per second)."""

    target: Address
    rate: float | None = None
    ramp: tuple[float, float, float] | None = None
    sources: int = 1
    flows: int = 1
    duration: float = 10.0
    payload: int = 64
    # Sources start this many addresses after 127.0.0.2, so concurrent plans
    # can use distinct sources.
    source_offset: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.ramp is None):
            raise ValueError("give exactly one of rate and ramp")
        rates = (self.rate,) if self.rate is not None else self.ramp or ()
        if not all(math.isfinite(r) and r >= 0 for r in rates) or self.max_rate <= 0:
            raise ValueError(f"rates must be finite, non-negative and not all zero: {rates}")
        if self.source_offset < 0 or not 1 <= self.sources <= 253 - self.source_offset:
            raise ValueError(
                f"sources must be 1..253 (127.0.0.2-254) after an offset of "
                f"{self.source_offset}, got {self.sources}"
            )
        if not self.sources <= self.flows <= MAX_FLOWS:
            raise ValueError(f"flows must be between sources ({self.sources}) and {MAX_FLOWS}")
        if not 0 < self.duration <= 86400:
            raise ValueError(f"duration must be in (0, 86400] seconds, got {self.duration}")
        if not HEADER.size <= self.payload <= 65507:
            raise ValueError(f"payload must be {HEADER.size}..65507 bytes, got {self.payload}")

    def rate_at(self, second: int) -> float:
        """Offered packets/s during second `second` (0-based) of the run."""
        if self.rate is not None:
            return self.rate
        assert self.ramp is not None
        start, stop, step = self.ramp
        # The step's magnitude moves the rate toward `stop`, down as well as up.
        if start <= stop:
            return min(stop, start + abs(step) * second)
        return max(stop, start - abs(step) * second)

    @property
    def max_rate(self) -> float:
        if self.rate is not None:
            return self.rate
        assert self.ramp is not None
        return max(self.ramp[0], self.ramp[1])


class Schedule:
    """Send times of a plan: packet k goes when the cumulative rate integral reaches k."""

    def __init__(self, plan: LoadPlan) -> None:
        self.duration = plan.duration
        seconds = math.ceil(plan.duration)
        self.rates = [plan.rate_at(s) for s in range(seconds)]
        self.cum = [0.0]  # cum[s]: packets due before second s
        for s, rate in enumerate(self.rates):
            self.cum.append(self.cum[-1] + rate * (min(s + 1.0, plan.duration) - s))
        self.cap = math.ceil(plan.max_rate * plan.duration) + SLACK
        self.total = min(self.cap, math.ceil(self.cum[-1] - 1e-9))

    def cumulative(self, t: float) -> float:
        """Packets due by time t (fractional)."""
        t = min(max(t, 0.0), self.duration)
        s = min(int(t), len(self.rates) - 1)
        return self.cum[s] + self.rates[s] * (t - s)

    def time_of(self, k: int) -> float:
        """Send time of packet k (seconds from start); inf if it is not in the run."""
        if k >= self.total:
            return math.inf
        s = bisect.bisect_right(self.cum, k) - 1
        return s + (k - self.cum[s]) / self.rates[s]

    def due(self, t: float) -> int:
        """How many packets should have been sent by time t."""
        k = math.floor(self.cumulative(t) + 1e-9)
        count = k + 1 if self.time_of(k) <= t else k
        return min(count, self.total)


def source_addresses(sources: int, offset: int = 0) -> list[str]:
    """127.0.0.2 ... : distinct loopback sources (Linux routes all of 127/8 to lo)."""
    if offset < 0 or not 1 <= sources <= 253 - offset:
        raise ValueError(f"sources must be 1..253 after an offset of {offset}, got {sources}")
    return [f"127.0.0.{2 + offset + i}" for i in range(sources)]


def flow_sources(sources: int, flows: int, offset: int = 0) -> list[str]:
    """The source address of each flow: flows dealt round-robin over the sources."""
    addresses = source_addresses(sources, offset)
    return [addresses[i % sources] for i in range(flows)]
