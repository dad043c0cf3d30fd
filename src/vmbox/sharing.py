"""Pure splits of a shared budget among the live replicas of a service.

Called by middleboxes (vmbox.functions.fixedwindow and tokenbucket) whenever the limit, the
group or the demand reports change. No I/O: members and reports in, shares out.

`even`: every replica gets `total / n`. `demand`: per source, each replica gets
`total` in proportion to the packets that source offered it in the last report
interval, plus a floor so a replica the source has just reached is not starved.
Both honour the resize guard (`Group.previous`): while a group change is not
acknowledged by every member, a replica takes the smaller of its old and new
share, and a replica absent from the old group takes nothing.

Shares are whole packets. Every replica computes the same integer shares from
the same inputs (integer arithmetic, ties broken by replica id), so the shares
of a group add up to exactly `total`. For `demand` the inputs must be the same
too: `window_tick` names the aggregator's summary a window divides by, the same
at every replica.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

from vmbox.group import Group

Reports = Mapping[str, Mapping[str, int]]  # replica -> source -> packets offered


def even(total: int, members: Sequence[str], me: str) -> int:
    """This replica's integer share of `total` under the even split.

    Shares are whole packets and add up to exactly `total`: the first
    `total % n` replicas in sorted order get one more. A replica that does not
    yet see its own registration counts itself as one more member, placed last,
    so it never claims more than its eventual share.
    """
    ordered = sorted(set(members))
    if me not in ordered:
        ordered.append(me)
    n = len(ordered)
    base, extra = divmod(total, n)
    return base + (1 if ordered.index(me) < extra else 0)


def even_share(total: int, group: Group) -> int:
    """`even` for `group.me`, the smaller of the old and new split while the guard is up."""
    share = even(total, group.members, group.me)
    if group.previous is not None:
        old = even(total, group.previous, group.me) if group.me in group.previous else 0
        share = min(share, old)
    return share


# When each demand report is written: the middle of its interval, half an interval off
# the windows' boundaries, so a report never races the start of a window.
REPORT_PHASE = 0.5
# When the demand summary a window divides by is written: a quarter interval before
# the end of each report interval (a quarter after the reports).
SUMMARY_PHASE = 0.75


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def next_tick(now: float, interval: float, phase: float = SUMMARY_PHASE) -> int:
    """The first tick after `now`: tick `i` falls at (i + phase) * interval (the
    summary's ticks unless another phase is given)."""
    return math.floor(now / interval - phase) + 1


def tick_time(tick: int, interval: float, phase: float = SUMMARY_PHASE) -> float:
    return (tick + phase) * interval


def window_tick(window_id: int, window: float, interval: float) -> int:
    """The tick whose summary window `window_id` divides by: the last one at least an
    interval before the window begins (at the defaults 125 ms before it), so the
    summary is at every replica when the window begins but for one far behind.

    Integer microseconds, so the aggregator (`owed_tick`) and every replica
    name the same tick for the same window.
    """
    w, i = _micros(window), _micros(interval)
    return (4 * window_id * w - 7 * i) // (4 * i)  # (i + 3/4) I <= id W - I


def owed_tick(tick: int, window: float, interval: float) -> int:
    """The latest window tick at or before `tick`: a summary named `tick` or later
    tells every replica that window's summary is in (the aggregator writes one at
    each tick until a write has covered it). `tick` is itself a window's tick
    exactly when this returns it.

    The window is the last one whose `window_tick` is at most `tick`: by
    `window_tick`'s arithmetic, the last v with 4 v W < (4 tick + 11) I.
    """
    w, i = _micros(window), _micros(interval)
    last = -(-(4 * tick + 11) * i // (4 * w)) - 1
    return window_tick(last, window, interval)


def floor_ratio(floor: float) -> tuple[int, int]:
    """The demand floor as an exact ratio p/q, so every replica rounds the same way."""
    ratio = Fraction(floor).limit_denominator(10_000)
    return ratio.numerator, ratio.denominator


def replica_set(members: Sequence[str], me: str) -> tuple[str, ...]:
    """The replicas a split is over: the members plus me, sorted."""
    if isinstance(members, tuple):
        return _replica_set(members, me)
    return tuple(sorted(set(members) | {me}))


@functools.lru_cache(maxsize=64)
def _replica_set(members: tuple[str, ...], me: str) -> tuple[str, ...]:
    # A group's set is asked for once per source it divides: sorting hundreds of
    # members for each of hundreds of sources was most of a replica's work at scale.
    return tuple(sorted(set(members) | {me}))


def source_share(
    total: int,
    counts: Mapping[str, int],
    replicas: Sequence[str],
    me: str,
    floor: tuple[int, int],
    *,
    remainders: bool = True,
) -> int | None:
    """`me`'s share of `total` for one source; None if no replica in `replicas` saw it.

    `counts` maps a replica to the packets the source offered it; `replicas`
    is sorted and contains `me` (see `replica_set`). Replica r weighs
    w_r = d_r + floor * D / n, D the source's offered total over the n
    replicas, and gets floor(total * w_r / W) plus, with `remainders`, one
    for the largest remainders (ties to the replica first in sorted order),
    so the shares add up to `total` exactly.

    O(k log n) for a source that k of the n replicas saw: the replicas it
    offered nothing all weigh the same, so they are counted together.
    """
    n = len(replicas)
    mine = bisect.bisect_left(replicas, me)
    if mine == n or replicas[mine] != me:
        raise ValueError(f"{me!r} is not in the replicas a share is divided over")
    seen = []  # (position in `replicas`, packets) of the replicas the source offered some
    for replica, offered in counts.items():
        if offered:
            at = bisect.bisect_left(replicas, replica)
            if at < n and replicas[at] == replica:
                seen.append((at, offered))
    demand = sum(offered for _, offered in seen)
    if demand <= 0:
        return None
    p, q = floor
    # Scaled by q * n so everything stays an integer: sum of weights = n*D*(p+q).
    whole = n * demand * (p + q)
    extra = p * demand
    base, mine_rem = divmod(total * (counts.get(me, 0) * q * n + extra), whole)
    if not remainders:
        return base
    idle_share, idle_rem = divmod(total * extra, whole)  # each replica it offered nothing
    left = total - (n - len(seen)) * idle_share
    ahead = 0  # replicas that come before me for a leftover packet
    seen_before_me = 0
    for at, offered in seen:
        share, rem = divmod(total * (offered * q * n + extra), whole)
        left -= share
        if rem > mine_rem or (rem == mine_rem and at < mine):
            ahead += 1
        seen_before_me += at < mine
    if idle_rem > mine_rem:
        ahead += n - len(seen)
    elif idle_rem == mine_rem:
        ahead += mine - seen_before_me  # the idle replicas sorted before me
    return base + (1 if ahead < left else 0)


def demand_shares(
    total: int, demand: Reports, members: Sequence[str], me: str, floor: float
) -> dict[str, int]:
    """`me`'s share of `total` for every source some member reported.

    Reports of replicas that are not members (nor me) are ignored. Sources in
    no report are absent from the result: they take the even share.
    """
    replicas = replica_set(members, me)
    by_source = index_reports(demand, replicas)
    ratio = floor_ratio(floor)
    shares = {}
    for source, counts in by_source.items():
        share = source_share(total, counts, replicas, me, ratio)
        if share is not None:
            shares[source] = share
    return shares


def guarded_source_share(
    total: int, counts: Mapping[str, int], group: Group, floor: tuple[int, int]
) -> int | None:
    """`source_share` over the group, the smaller of old and new while the guard is up.

    `previous` may be the union of several groups (vmbox.state.epoch): a
    replica's fraction only shrinks as members are added, and rounding that
    side down keeps its share at most its share under each of those groups.
    """
    share = source_share(total, counts, replica_set(group.members, group.me), group.me, floor)
    if group.previous is None:
        return share
    if group.me not in group.previous:
        return None if share is None else 0  # a joiner takes nothing (its even share is 0)
    old = source_share(
        total, counts, replica_set(group.previous, group.me), group.me, floor, remainders=False
    )
    if share is None and old is None:
        return None  # offered under neither: the even share, which even_share guards
    # A side none of whose replicas was offered the source would give it the even
    # share: a source offered only to a replica that left (or only to a joiner)
    # takes the smaller of that and the other side's demand share, not the even
    # share alone. (A survivor that began its window after its sibling died once
    # passed 34 of 100 beside the 97 the dead one had passed.)
    new_side = even(total, group.members, group.me) if share is None else share
    old_side = even(total, group.previous, group.me) if old is None else old
    return min(new_side, old_side)


def group_demand_shares(total: int, demand: Reports, group: Group, floor: float) -> dict[str, int]:
    """`demand_shares` for `group.me`, honouring the resize guard like `even_share`."""
    replicas = set(group.members) | {group.me} | set(group.previous or ())
    ratio = floor_ratio(floor)
    shares = {}
    for source, counts in index_reports(demand, sorted(replicas)).items():
        share = guarded_source_share(total, counts, group, ratio)
        if share is not None:
            shares[source] = share
    return shares


def index_reports(demand: Reports, replicas: Sequence[str]) -> dict[str, dict[str, int]]:
    """source -> replica -> offered, from the reports of `replicas` only."""
    by_source: dict[str, dict[str, int]] = {}
    for replica in replicas:
        for source, count in demand.get(replica, {}).items():
            by_source.setdefault(source, {})[replica] = count
    return by_source
