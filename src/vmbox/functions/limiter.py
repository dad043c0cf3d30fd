"""What the ratelimit middlebox's two algorithms share: the base class `RateLimiter`.

vmbox.functions.fixedwindow and vmbox.functions.tokenbucket each subclass it;
vmbox.functions.ratelimit picks one by the spec's `algorithm`. The base holds
the declared state (the shared `limit`), the demand the replica was offered
per source (counted by each algorithm's `process`, collected by
vmbox.state.demandsync every report interval) and the demand reports of the group
(a DemandIndex, re-divided by the algorithm as they change), the even share
and the gauges both export. It decides no packet: that is each algorithm's.

Memory is bounded: each algorithm's table holds at most `max_sources` sources;
further new sources share one overflow entry (`OVERFLOW`) held to the even
share, so a flood of fresh addresses can neither grow memory nor get through
unlimited. The offered counts are bounded the same way per report interval.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

from vmbox import sharing
from vmbox.functions.demandindex import DemandIndex, Report
from vmbox.group import Group
from vmbox.middlebox import Middlebox, StateItem, encode_int, parse_limit
from vmbox.packet import Packet, Verdict

OVERFLOW = "<overflow>"


class RateLimiter(Middlebox):
    """A per-source limit of `limit` packets per `window`, split among the replicas."""

    state = (StateItem("limit", "limit", parse=parse_limit, encode=encode_int, closed=0),)
    algorithm = ""

    def __init__(self, config: Mapping[str, Any], group: Group) -> None:
        super().__init__(config, group)
        self.window = float(config.get("window", 1.0))
        if self.window <= 0:
            raise ValueError("window must be positive")
        self.max_sources = int(config.get("max_sources", 65536))
        self.demand = config.get("split", "even") == "demand"
        self.floor = sharing.floor_ratio(float(config.get("demand_floor", 0.05)))
        self.offered: dict[str, int] = {}  # packets per source since the last report
        self.index = DemandIndex()
        self.latest_reports: Mapping[str, Report] = {}
        self.demand_max = 0  # the largest demand share, for the gauges
        self.share = 0  # from the current limit and group
        self.overflowed = 0

    @property
    def limit(self) -> int:
        return int(self.values["limit"])

    def take_demand(self) -> dict[str, int]:
        """The packets each source offered since the last call (for the demand reporter)."""
        offered, self.offered = self.offered, {}
        return offered

    def set_demand(self, reports: Mapping[str, Report], tick: int | None = None) -> None:
        """Take the latest demand reports of the group: replica -> source -> offered.

        `tick`: the summary tick they were written for (the aggregator's); None
        when they apply at once. Only the fixed window's use of it differs.
        """
        self.latest_reports = reports
        if self.demand:
            self.demand_changed(self.index.replace(reports, self.keep_reports()))

    @abstractmethod
    def process(self, packet: Packet, now: float, cost: int | None = None) -> Verdict:
        """Decide one packet that costs `cost` (its size in bytes under `unit: bytes`).

        None: the packets it is on the wire (`packet.segments`, more than 1 for GSO).
        """

    @abstractmethod
    def keep_reports(self) -> tuple[str, ...]:
        """Replicas whose report outlives them for now."""

    @abstractmethod
    def demand_changed(self, sources: set[str]) -> None:
        """Re-divide these sources: their reports changed."""

    @abstractmethod
    def algorithm_gauges(self) -> dict[str, float]:
        """What differs between the algorithms: the share in force, tracked and demand sources."""

    def gauges(self) -> dict[str, float]:
        values = {
            "share": float(self.share),
            "limit": float(self.values["limit"]),
            "overflowed_sources": float(self.overflowed),
        }
        values |= self.algorithm_gauges()
        if self.demand:
            values |= {
                "demand_reports": float(len(self.index.reports)),
                "demand_share_max": float(self.demand_max),
            }
        return values
