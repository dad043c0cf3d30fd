"""The ratelimit middlebox's `algorithm: token_bucket` (pure, like its fixed window).

vmbox.functions.ratelimit builds a `TokenBucket` when the config asks for one.
Each source has a bucket that refills at this replica's share of `limit` per
`window` and holds at most its share of `burst` (default: `limit`); a packet
passes when a whole token is there. Shares come from the same split as the
fixed window's (even or demand, with the resize guard), so the replicas'
rates add up to at most `limit` per window and their capacities to `burst`.

Unlike a window, a bucket carries state across time, so a share change is
applied the way a real bucket would see it: buckets are first refilled at
the old rate up to the last packet's time, then clamped to the new capacity.
Tokens never appear from nowhere: a replica admits nothing before its first
whole window (as the fixed window does; by then it sees its group), and a
bucket it has never had starts as if it had been filling since then. That
makes a full bucket the same as no bucket, so a sweep each window drops full
ones, and the table stays bounded by `max_sources` plus one overflow bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from vmbox import sharing
from vmbox.functions.limiter import OVERFLOW, RateLimiter
from vmbox.group import Group
from vmbox.packet import Packet, Verdict

Params = tuple[float, float]  # refill rate (tokens per second), capacity


class TokenBucket(RateLimiter):
    """Drop a source's packets when its bucket holds no whole token."""

    algorithm = "token_bucket"

    def __init__(self, config: Mapping[str, Any], group: Group) -> None:
        super().__init__(config, group)
        burst: Any = self.config.get("burst")
        self.burst: int | None = int(burst) if burst else None  # None: follow `limit`
        self.buckets: dict[str, list[float]] = {}  # source -> [tokens, last refill time]
        self.default: Params = (0.0, 0.0)  # the even split's
        self.params: dict[str, Params] = {}  # the demand split's, by source
        self.burst_share = 0
        self.started = -math.inf  # no packet passes before this time
        self.now = -math.inf  # the last packet's time: when a share change takes effect
        self.next_sweep = -math.inf
        self.recompute()

    @property
    def capacity(self) -> int:
        if self.limit == 0:
            return 0  # a limit of 0 admits nothing, whatever the burst says
        return self.burst if self.burst is not None else self.limit

    def start(self, now: float) -> None:
        self.started = (math.floor(now / self.window) + 1) * self.window

    def keep_reports(self) -> tuple[str, ...]:
        return ()  # a bucket has no window to finish: shares follow the group at once

    def recompute(self) -> None:
        self._settle(list(self.buckets))
        self.share = sharing.even_share(self.limit, self.group)
        self.burst_share = sharing.even_share(self.capacity, self.group)
        self.default = (self.share / self.window, float(self.burst_share))
        if self.demand:
            self.params = {}
            self._divide_rates(list(self.index.by_source))
        self._clamp(list(self.buckets))

    def demand_changed(self, sources: set[str]) -> None:
        self._settle(sources)
        self._divide_rates(sources)
        self._clamp(sources)

    def _divide_rates(self, sources: Iterable[str]) -> None:
        limit, burst, group, floor = self.limit, self.capacity, self.group, self.floor
        for source in sources:
            counts = self.index.by_source.get(source)
            if counts is None:
                self.params.pop(source, None)
                continue
            rate = sharing.guarded_source_share(limit, counts, group, floor)
            cap = sharing.guarded_source_share(burst, counts, group, floor)
            self.params[source] = (float(rate or 0) / self.window, float(cap or 0))
        self.demand_max = int(max((r for r, _ in self.params.values()), default=0) * self.window)

    def _settle(self, sources: Iterable[str]) -> None:
        """Refill these buckets at their current rate up to the last packet's time."""
        now = self.now
        for source in sources:
            bucket = self.buckets.get(source)
            if bucket is not None and now > bucket[1]:
                rate, cap = self.params.get(source, self.default)
                bucket[0] = min(cap, bucket[0] + (now - bucket[1]) * rate)
                bucket[1] = now

    def _clamp(self, sources: Iterable[str]) -> None:
        for source in sources:
            bucket = self.buckets.get(source)
            if bucket is not None:
                bucket[0] = min(bucket[0], self.params.get(source, self.default)[1])

    def _initial(self, source: str, now: float) -> float:
        """A new bucket's tokens: as if filling since the replica started."""
        rate, cap = self.params.get(source, self.default)
        if self.started == -math.inf:
            return cap
        return min(cap, max(0.0, now - self.started) * rate)

    def _sweep(self, now: float) -> None:
        """Drop the buckets that are full by now: a new one would be the same."""
        params, default = self.params, self.default
        for source, (tokens, last) in list(self.buckets.items()):
            rate, cap = params.get(source, default)
            if tokens + (now - last) * rate >= cap:
                del self.buckets[source]
        self.next_sweep = now + self.window

    def idle(self, now: float) -> None:
        """Drop the full buckets when a sweep is due, as the next packet would."""
        if now >= self.next_sweep:
            self._sweep(now)

    def process(self, packet: Packet, now: float, cost: int | None = None) -> Verdict:
        """Decide one packet that takes `cost` tokens (its size under `unit: bytes`).

        None (the default): the packets it is on the wire, `packet.segments`.
        """
        if cost is None:
            cost = packet.segments
        self.now = now
        key = packet.src
        if self.demand:
            # Offered, dropped or not: the demand this replica reports (inline: hot path).
            offered = self.offered
            times = offered.get(key)
            if times is not None:
                offered[key] = times + cost
            elif len(offered) < self.max_sources:
                offered[key] = cost
        if now < self.started:
            return Verdict.DROP
        if now >= self.next_sweep:
            self._sweep(now)
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_sources:
                key = OVERFLOW
                self.overflowed += 1
                bucket = self.buckets.get(OVERFLOW)
            if bucket is None:
                bucket = self.buckets[key] = [self._initial(key, now), now]
        rate, cap = self.params.get(key, self.default)
        tokens = bucket[0]
        elapsed = now - bucket[1]
        if elapsed > 0:
            tokens += elapsed * rate
            if tokens > cap:
                tokens = cap
            bucket[1] = now
        if tokens >= cost:
            bucket[0] = tokens - cost
            return Verdict.PASS
        bucket[0] = tokens
        return Verdict.DROP

    def algorithm_gauges(self) -> dict[str, float]:
        values = {"burst_share": float(self.burst_share), "sources": float(len(self.buckets))}
        if self.demand:
            values["demand_sources"] = float(len(self.params))
        return values
