"""Pure: the rates a node's table enforces, from the shares the replica's middlebox holds.

Under `enforce: kernel` the replica still builds its middlebox (the same
ratelimit rule set as in Python) and feeds it the limit values and the group
as the resize guard gives it; the middlebox never sees a packet, but its
limiters compute each rule's share of the limit, and `node_rates` turns those
shares into the nftables rates of vmbox.enforce.nftables:

- `token_bucket`: the share per window, with the limiter's share of `burst`
  (the spec's bucket, split as the rate is);
- `fixed_window`: the kernel has no per-element window (docs/nftables-rates.md),
  so a window's share becomes a bucket refilled at share/window holding
  `FIXED_WINDOW_BURST` of the share, and at least MIN_PACKETS_BURST packets:
  at most that much more than the share in any window, and the share per
  window at a steady offer. The floor matters at small shares: a node's
  packets arrive unevenly (the router hashes flows, not packets, over the
  nodes), and a bucket of 1 wastes every token that falls due between two
  arrivals more than a token apart. Measured: four nodes at a share of 25/s,
  each offered about 65/s, passed 19 to 21/s each with a bucket of 1 (77/s
  of 100 in all), 25/s with a bucket of 3.

A share follows the group at once (as the token bucket's does: a rate has no
window to finish), so a resize is safe exactly when the guard's shares are:
the guard gives the smaller share until every member has acked the change.
A share of 0 (a replica that has not settled, or is leaving; a limit of 0)
closes the rule: everything it matches is dropped.

`split: demand`: the limiter gives each source in the group's demand reports
a share of its own (vmbox.sharing), and `source_rates` turns those into
per-source rates, which the node holds in a chain per source
(vmbox.enforce.nftables.source_changes); the node's own reads of what each
source offered (`add_offered`) are the replica's demand report. A new rate
restarts that source's bucket full, so `settle_sources` keeps a rate until
the share moves: a lower share is applied at once (the shares of a source
over all nodes must never add up to more than its limit), a higher one only
once it is RAISE_MARGIN above the rate in force (held below its share, a
source is safe; without the margin a share that wobbles by a packet would
restart the bucket at every report).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping

from vmbox.enforce.nftables import PER_SECONDS, Rate, Table, rate_for, versions
from vmbox.functions.fixedwindow import FixedWindow
from vmbox.functions.limiter import RateLimiter
from vmbox.functions.rules import CATCH_ALL, RuleSet, limit_item
from vmbox.functions.tokenbucket import TokenBucket
from vmbox.middlebox import Middlebox

RAISE_MARGIN = 0.02  # a source's rate rises only once its share is this much above it
FIXED_WINDOW_BURST = 0.05  # of the share: a fixed window's bucket in the kernel
MIN_PACKETS_BURST = 3  # and at least this many packets (bytes: nftables adds a second's rate)


def limiters_of(middlebox: Middlebox) -> Mapping[str, RateLimiter]:
    """Each ratelimit rule's limiter by its state item (`limit` for a spec without rules)."""
    if isinstance(middlebox, RuleSet):
        return middlebox.limiters
    if isinstance(middlebox, RateLimiter):
        return {CATCH_ALL: middlebox}
    raise TypeError(f"enforce: kernel enforces ratelimit rules, not {type(middlebox).__name__}")


def burst_of(limiter: RateLimiter, unit: str = "packets") -> int:
    """The bucket a share gets in the kernel (packets, or bytes under `unit: bytes`)."""
    if isinstance(limiter, TokenBucket):
        return limiter.burst_share
    return window_burst(limiter.share, unit)


def window_burst(share: int, unit: str) -> int:
    """A fixed window's share as a bucket: FIXED_WINDOW_BURST of it, MIN_PACKETS_BURST at least."""
    least = MIN_PACKETS_BURST if unit == "packets" else 1
    return max(least, math.floor(share * FIXED_WINDOW_BURST))


def node_rates(middlebox: Middlebox, table: Table) -> dict[str, Rate]:
    """Every ratelimit rule of `table` at the share its limiter holds now."""
    limiters = limiters_of(middlebox)
    rates = {}
    for _, rule in table.limited():
        limiter = limiters[limit_item(rule.name)]
        burst = burst_of(limiter, rule.unit)
        rates[rule.name] = rate_for(limiter.share, limiter.window, burst)
    return rates


def closed_rates(table: Table) -> dict[str, Rate]:
    """Every ratelimit rule at a share of 0: the table admits nothing they match."""
    return {rule.name: Rate(0) for _, rule in table.limited()}


def source_rates(middlebox: Middlebox, table: Table) -> dict[str, dict[str, Rate]]:
    """split: demand: per ratelimit rule, each source with a share of its own, as a rate.

    A source that is not an address of an IP version the rule matches (a report
    is another replica's words) is left out: it keeps the rule's rate."""
    if not table.demand:
        return {}
    limiters = limiters_of(middlebox)
    result = {}
    for _, rule in table.limited():
        limiter = limiters[limit_item(rule.name)]
        allowed = versions(rule)
        rates = {}
        for source, (share, burst) in _demand_shares(limiter, rule.unit).items():
            try:
                version = ipaddress.ip_address(source).version
            except ValueError:
                continue
            if version in allowed:
                rates[source] = rate_for(share, limiter.window, burst)
        result[rule.name] = rates
    return result


def _demand_shares(limiter: RateLimiter, unit: str) -> dict[str, tuple[int, int]]:
    """Each source's share per window and its bucket, from the limiter's demand split."""
    if isinstance(limiter, TokenBucket):
        return {
            source: (round(rate * limiter.window), math.floor(cap))
            for source, (rate, cap) in limiter.params.items()
        }
    if isinstance(limiter, FixedWindow):
        return {
            source: (share, window_burst(share, unit)) for source, share in limiter.allow.items()
        }
    return {}


def per_second(rate: Rate) -> float:
    return rate.amount / PER_SECONDS[rate.per]


def settle_sources(
    wanted: Mapping[str, Mapping[str, Rate]], applied: Mapping[str, Mapping[str, Rate]]
) -> dict[str, dict[str, Rate]]:
    """What to hold per source: `wanted`, except that a rate in force is kept while the
    wanted one is no lower (rate and bucket) and under RAISE_MARGIN above it."""
    result = {}
    for rule, sources in wanted.items():
        before = applied.get(rule, {})
        mine = {}
        for source, new in sources.items():
            old = before.get(source)
            keep = (
                old is not None
                and new.burst >= old.burst
                and per_second(old) <= per_second(new) < per_second(old) * (1 + RAISE_MARGIN)
            )
            mine[source] = old if keep and old is not None else new
        result[rule] = mine
    return result


def add_offered(middlebox: Middlebox, rule: str, offered: Mapping[str, int]) -> None:
    """What the node counted each source offer (under a ratelimit rule) since the last read,
    into that rule's limiter's demand count: the replica's next demand report."""
    limiter = limiters_of(middlebox).get(limit_item(rule))
    if limiter is None:
        return
    counts = limiter.offered
    for source, amount in offered.items():
        if source in counts:
            counts[source] += amount
        elif len(counts) < limiter.max_sources:
            counts[source] = amount
