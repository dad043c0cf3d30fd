"""The ratelimit middlebox's `algorithm: fixed_window` (the default; pure).

Each source IP gets a counter per window, aligned to the epoch so every
replica's windows coincide; once the count reaches this replica's share of the
global `limit`, the source's packets are dropped until the window resets.

The share comes from a split of `limit` among the live replicas
(vmbox.sharing): `even` (limit / n), or `demand`, where each replica reports
the packets each source offered it (counted here, dropped ones included) and a
replica's share of a source follows its fraction of that source's offered
total, so a source whose traffic lands on one replica still gets `limit`.
Sources in no report take the even share.

Resizes never over-admit within a window: a replica cannot know what its
siblings passed earlier in the current window, so the group a window's shares
come from is the one the window began with (a member that leaves keeps its last
demand report until the window ends), and a replica that starts mid-window
admits nothing until the next one. Under the even split, the groups the
resize guard hands over are the exception: a raise applies at once (see
`_guard_eases`). A new `limit` applies at once. Under the
demand split a source's share is likewise fixed for a window when the window
begins, so the replicas' allowances of a window come from one set of reports
and add up to the limit however the reports fluctuate; only a source that no
report had then follows the reports within the window, so a new source gets
its share within a report interval or two.

The table holds at most `max_sources` sources per window (vmbox.functions.limiter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from vmbox import sharing
from vmbox.functions.limiter import OVERFLOW, RateLimiter
from vmbox.group import Group
from vmbox.packet import Packet, Verdict

_NONE: Mapping[str, int] = MappingProxyType({})


class FixedWindow(RateLimiter):
    """Drop a source's packets past its share of `limit` per window."""

    algorithm = "fixed_window"

    def __init__(self, config: Mapping[str, Any], group: Group) -> None:
        super().__init__(config, group)
        self.counts: dict[str, int] = {}
        self.window_id = -1
        self.first_window: int | None = None
        # The group as it was when the window began: shares within a window
        # come from it, so a group change takes effect at the next window.
        self.window_group = self.group
        self.window_share = 0  # the even share this window admits per source
        self.allow: dict[str, int] = {}  # demand shares from the latest reports, by source
        self.window_allow: dict[str, int] = {}  # this window's demand shares
        self.live: set[str] = set()  # sources new in this window: they follow the reports
        self.table: Mapping[str, int] = _NONE  # what process() consults
        self.allow_limit = -1  # the limit `allow` was computed for
        self.recompute()

    def keep_reports(self) -> tuple[str, ...]:
        """Replicas whose report outlives them for now (the window's members)."""
        return self.window_group.members

    def start(self, now: float) -> None:
        self.first_window = math.floor(now / self.window)

    def recompute(self) -> None:
        self.share = sharing.even_share(self.limit, self.group)
        if self._guard_eases():
            self.window_group = self.group  # for the rest of this window too
        self.window_share = self._window_share()
        if self.demand and self.allow_limit != self.limit:
            # A new limit applies at once, to the window's fixed shares too.
            self._divide(set(self.allow) | set(self.index.by_source))
            self.window_allow.update(self.allow)

    def _guard_eases(self) -> bool:
        """The resize guard raised this replica's even share: take it within the window.

        While the guard is on, the share it gives at any moment of a window is
        safe for the whole window: at most the share under every set not yet
        settled, and a set settles only once all its members take their
        shares from it (vmbox.state.epoch; tests/unit/test_epoch.py checks the
        limit with each replica's largest share at any moment of a window).
        So the larger of the window's first share and the guard's latest is
        safe. Taking a raise at once spares a joiner (or a survivor) one
        window at nothing (or at its old share); a lower share still waits for
        the next window, as taking it at once would cut the window short.
        Changes between two unguarded groups (the guard turned off) wait too,
        and the demand split, whose shares of a window come from one set of
        reports, keeps that rule.
        """
        old, new = self.window_group, self.group
        guarded = old.previous is not None or new.previous is not None
        if self.demand or not guarded or new.me != old.me:
            return False
        return self.share > sharing.even_share(self.limit, old)  # share: the new group's

    def _window_share(self) -> int:
        if self.window_id == self.first_window:
            return 0
        return sharing.even_share(self.limit, self.window_group)

    def demand_changed(self, sources: set[str]) -> None:
        self._divide(sources)

    def _divide(self, sources: set[str]) -> None:
        """Re-divide `sources` under the demand split, over the window's group.

        `allow` follows the reports; the window's own table takes the new
        shares only of the sources it did not have when the window began.
        """
        limit, group, by_source = self.limit, self.window_group, self.index.by_source
        allow, window_allow, live = self.allow, self.window_allow, self.live
        for source in sources:
            counts = by_source.get(source)
            share = None
            if counts is not None:
                share = sharing.guarded_source_share(limit, counts, group, self.floor)
            if share is None:
                allow.pop(source, None)  # the window's table keeps it until the window ends
                continue
            allow[source] = share
            if source in live or source not in window_allow:
                window_allow[source] = share
                live.add(source)
        self.allow_limit = limit
        self.demand_max = max(allow.values(), default=0)

    def _new_window(self, window_id: int) -> None:
        # A new window resets every counter: dropping the table is both the
        # reset and what keeps it bounded to one window's sources.
        self.window_id = window_id
        self.counts = {}
        regrouped = self.window_group != self.group
        self.window_group = self.group
        self.window_share = self._window_share()
        if not self.demand:
            return
        # Reports of members that left go now; a new group re-divides everything.
        touched = self.index.replace(self.latest_reports)
        if regrouped:
            touched |= set(self.allow) | set(self.index.by_source)
        self._divide(touched)
        # The window's shares are fixed now, so however the reports fluctuate
        # the replicas' allowances of this window add up to the limit.
        self.window_allow = dict(self.allow)
        self.live = set()
        self.table = _NONE if window_id == self.first_window else self.window_allow

    def idle(self, now: float) -> None:
        """Begin the window of `now` if no packet has: its table goes with the window's sources.

        The same step the window's first packet would take (and that packet
        then finds the window begun), so a verdict never changes.
        """
        window_id = math.floor(now / self.window)
        if window_id != self.window_id:
            self._new_window(window_id)

    def process(self, packet: Packet, now: float, cost: int | None = None) -> Verdict:
        """Decide one packet that costs `cost` against the allowance.

        `cost` is its size under `unit: bytes`; None (the default) counts it as
        the packets it is on the wire (`packet.segments`: 1 but for GSO packets).
        """
        if cost is None:
            cost = packet.segments
        window_id = math.floor(now / self.window)
        if window_id != self.window_id:
            self._new_window(window_id)
        key = packet.src
        if self.demand:
            # Offered, dropped or not: the demand this replica reports (inline: hot path).
            offered = self.offered
            times = offered.get(key)
            if times is not None:
                offered[key] = times + cost
            elif len(offered) < self.max_sources:
                offered[key] = cost
            allowance = self.table.get(key, self.window_share)
        else:
            allowance = self.window_share
        count = self.counts.get(key)
        if count is None:
            if len(self.counts) >= self.max_sources:
                key = OVERFLOW
                self.overflowed += 1
                count = self.counts.get(OVERFLOW, 0)
                allowance = self.window_share
            else:
                count = 0
        count += cost
        if count > allowance:
            return Verdict.DROP
        self.counts[key] = count
        return Verdict.PASS

    def algorithm_gauges(self) -> dict[str, float]:
        """What differs between the algorithms: the share in force, tracked and demand sources."""
        values = {"window_share": float(self.window_share), "sources": float(len(self.counts))}
        if self.demand:
            values["demand_sources"] = float(len(self.window_allow))
        return values
