"""Per-source rate-limiting firewall: the first shipped middlebox.

Each source IP gets a counter per fixed window (aligned to the epoch so every
replica's windows coincide). Once a source's count reaches this replica's share
of the global `limit`, its packets are dropped until the window resets. The
share comes from the split of `limit` among the live replicas.

Resizes never over-admit within a window: a replica cannot know what its
siblings passed earlier in the current window, so a new share that comes from
a change of the group takes effect at the next window, and a replica that
starts mid-window admits nothing until the next one. The old shares of the
window's members add up to at most the limit, so neither a join nor a leave
lets more through. A new `limit` applies at once (a consistency mode promises
exactly that), in both directions.

Memory is bounded: the table holds at most `max_sources` sources per window;
further new sources share one overflow counter held to the same share, so a
flood of fresh addresses can neither grow memory nor get through unlimited.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vmbox.middlebox import Group, Middlebox, StateItem, encode_int, parse_positive_int, register
from vmbox.packet import Packet, Verdict
from vmbox.state import sharing

OVERFLOW = "<overflow>"


@register("ratelimit")
class RateLimit(Middlebox):
    """Drop a source's packets past its share of `limit` per window."""

    state = (
        StateItem(name="limit", config_key="limit", parse=parse_positive_int, encode=encode_int),
    )

    def __init__(self, config: Mapping[str, Any], group: Group) -> None:
        super().__init__(config, group)
        self.window = float(config.get("window", 1.0))
        if self.window <= 0:
            raise ValueError("window must be positive")
        self.max_sources = int(config.get("max_sources", 65536))
        self.counts: dict[str, int] = {}
        self.window_id = -1
        self.first_window: int | None = None
        self.share = 0  # from the current limit and group
        # The group as it was when the window began: shares within a window
        # come from it, so a group change takes effect at the next window.
        self.window_members = group.members
        self.window_share = 0  # what this window admits per source
        self.overflowed = 0
        self.recompute()

    def start(self, now: float) -> None:
        self.first_window = math.floor(now / self.window)

    def recompute(self) -> None:
        self.share = sharing.even(int(self.values["limit"]), self.group.members, self.group.me)
        self.window_share = self._window_share()

    def _window_share(self) -> int:
        if self.window_id == self.first_window:
            return 0
        return sharing.even(int(self.values["limit"]), self.window_members, self.group.me)

    def process(self, packet: Packet, now: float) -> Verdict:
        window_id = math.floor(now / self.window)
        if window_id != self.window_id:
            # A new window resets every counter: dropping the table is both the
            # reset and what keeps it bounded to one window's sources.
            self.window_id = window_id
            self.counts = {}
            self.window_members = self.group.members
            self.window_share = self._window_share()
        key = packet.src
        count = self.counts.get(key)
        if count is None:
            if len(self.counts) >= self.max_sources:
                key = OVERFLOW
                self.overflowed += 1
                count = self.counts.get(OVERFLOW, 0)
            else:
                count = 0
        if count >= self.window_share:
            return Verdict.DROP
        self.counts[key] = count + 1
        return Verdict.PASS

    def gauges(self) -> dict[str, float]:
        return {
            "share": float(self.share),
            "window_share": float(self.window_share),
            "limit": float(self.values["limit"]),
            "sources": float(len(self.counts)),
            "overflowed_sources": float(self.overflowed),
        }
