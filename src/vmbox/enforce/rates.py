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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from vmbox.enforce.nftables import Rate, Table, rate_for
from vmbox.functions.limiter import RateLimiter
from vmbox.functions.rules import CATCH_ALL, RuleSet, limit_item
from vmbox.functions.tokenbucket import TokenBucket
from vmbox.middlebox import Middlebox

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
    least = MIN_PACKETS_BURST if unit == "packets" else 1
    return max(least, math.floor(limiter.share * FIXED_WINDOW_BURST))


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
