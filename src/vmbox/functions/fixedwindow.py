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
demand split a source's shares are likewise fixed for a window, from the
aggregator's summary of the window's tick (vmbox.sharing.window_tick), so the
replicas' allowances of a window come from one set of reports and add up to
the limit however the reports fluctuate and whenever each replica begins the
window. A replica that begins a window before that summary came admits
nothing until it does, or until GRACE_INTERVALS report intervals have passed
(then it divides by the newest summary before the tick, as every replica
whose summary did not come does). A source the summary lacks takes the even
share until the window ends. Reports that come without a tick (a replica
following every report itself, the protocol before the aggregator) are
taken when the window begins, and a source they lacked then follows them.

The table holds at most `max_sources` sources per window (vmbox.functions.limiter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from vmbox import sharing
from vmbox.functions.demandindex import Report
from vmbox.functions.limiter import OVERFLOW, RateLimiter
from vmbox.group import Group
from vmbox.packet import Packet, Verdict

_NONE: Mapping[str, int] = MappingProxyType({})
_NONE_REPORTS: Mapping[str, Report] = MappingProxyType({})
# How long after a window begins it waits for its summary, in report intervals
# (the summary is written an interval and a quarter before the window begins).
GRACE_INTERVALS = 2
MAX_SUMMARIES = 64  # named summaries kept (about 10 a window at the defaults)


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
        # Summaries named by their tick (the aggregator's), oldest first: a window
        # divides by the one of its tick (vmbox.sharing.window_tick), and one begun
        # before that summary came admits nothing until it does, or until
        # `grace` after the window began (then it divides by the newest before it).
        self.interval = float(config.get("report_interval", 0.1))
        self.grace = GRACE_INTERVALS * self.interval
        self.summaries: list[tuple[int | None, Mapping[str, Report]]] = []
        self.newest = -1  # the latest tick taken
        self.tick = -1  # the tick this window divides by
        self.awaiting = False
        self.await_until = 0.0
        self.window_reports: Mapping[str, Report] | None = None
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
            if not self._named():
                self.window_allow.update(self.allow)
            elif not self.awaiting and self.window_reports is not None:
                self._fix_shares(self.window_reports)

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
        if self.window_id == self.first_window or self.awaiting:
            return 0
        return sharing.even_share(self.limit, self.window_group)

    def set_demand(self, reports: Mapping[str, Report], tick: int | None = None) -> None:
        if tick is None:
            self.summaries = [(None, reports)]
        else:
            self.summaries.append((tick, reports))
            del self.summaries[:-MAX_SUMMARIES]
            self.newest = max(self.newest, tick)
        super().set_demand(reports, tick)
        if self.awaiting and self.newest >= self.tick:
            self._settle()

    def _named(self) -> bool:
        """Whether the reports come as summaries named by their tick (the aggregator's)."""
        return bool(self.summaries) and self.summaries[-1][0] is not None

    def demand_changed(self, sources: set[str]) -> None:
        self._divide(sources)

    def _divide(self, sources: set[str]) -> None:
        """Re-divide `sources` under the demand split, over the window's group.

        `allow` follows the reports; without named summaries, the window's own
        table takes the new shares only of the sources it did not have when the
        window began (with them, the table is the window's summary's alone).
        """
        limit, group, by_source = self.limit, self.window_group, self.index.by_source
        allow, window_allow, live = self.allow, self.window_allow, self.live
        follow = not self._named()
        for source in sources:
            counts = by_source.get(source)
            share = None
            if counts is not None:
                share = sharing.guarded_source_share(limit, counts, group, self.floor)
            if share is None:
                allow.pop(source, None)  # the window's table keeps it until the window ends
                continue
            allow[source] = share
            if follow and (source in live or source not in window_allow):
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
        self.live = set()
        if self._named():
            # Every replica divides this window by the summary of its tick, whenever
            # it begins the window and whatever came since: their allowances add up
            # to the limit. Until that summary is here, nothing passes.
            self.tick = sharing.window_tick(window_id, self.window, self.interval)
            self.await_until = window_id * self.window + self.grace
            self.awaiting = True
            self.window_share = 0
            self.window_allow, self.table = {}, _NONE
            if self.newest >= self.tick:
                self._settle()
            return
        # The window's shares are fixed now, so however the reports fluctuate
        # the replicas' allowances of this window add up to the limit.
        self.window_allow = dict(self.allow)
        self.table = _NONE if window_id == self.first_window else self.window_allow

    def _settle(self) -> None:
        """Divide the window by the newest summary of its tick or before (see _new_window)."""
        reports: Mapping[str, Report] = _NONE_REPORTS
        for at, (tick, summary) in reversed(list(enumerate(self.summaries))):
            if tick is not None and tick <= self.tick:
                reports = summary
                del self.summaries[:at]  # no later window divides by an older one
                break
        self.awaiting = False
        self.window_reports = reports
        self.window_share = self._window_share()
        self._fix_shares(reports)

    def _fix_shares(self, reports: Mapping[str, Report]) -> None:
        """The window's table: every reported source's share over the window's group."""
        if self.window_id == self.first_window:
            self.window_allow, self.table = {}, _NONE
            return
        group = self.window_group
        replicas = sorted(set(group.members) | {group.me} | set(group.previous or ()))
        shares = {}
        for source, counts in sharing.index_reports(reports, replicas).items():
            share = sharing.guarded_source_share(self.limit, counts, group, self.floor)
            if share is not None:
                shares[source] = share
        self.window_allow = self.table = shares

    def idle(self, now: float) -> None:
        """Begin the window of `now` if no packet has: its table goes with the window's sources.

        The same step the window's first packet would take (and that packet
        then finds the window begun), so a verdict never changes.
        """
        window_id = math.floor(now / self.window)
        if window_id != self.window_id:
            self._new_window(window_id)
        if self.awaiting and now >= self.await_until:
            self._settle()

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
            if self.awaiting and now >= self.await_until:
                self._settle()  # its summary is late: divide by the newest before it
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
