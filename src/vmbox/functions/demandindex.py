"""The demand reports one replica has seen, indexed by source (pure).

vmbox.functions.ratelimit keeps one `DemandIndex`: each new snapshot of the
reports (replica -> source -> packets offered, from vmbox.state.demand) is
diffed against the last one, so only the sources of reports that changed are
re-divided. With n replicas each reporting up to K sources every interval,
that is O(n * K) share computations per interval, not O(n * n * K).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

Report = Mapping[str, int]  # source -> packets offered in the last report interval


class DemandIndex:
    """Reports by replica, and the same counts by source."""

    def __init__(self) -> None:
        self.reports: dict[str, Report] = {}
        self.by_source: dict[str, dict[str, int]] = {}

    def replace(self, reports: Mapping[str, Report], keep: Collection[str] = ()) -> set[str]:
        """Take a new snapshot and return the sources whose counts changed.

        A replica in `keep` whose report vanished keeps its last one (a member
        that left mid-window: what it admitted still counts until the window ends).
        """
        new = dict(reports)
        for replica in keep:
            if replica not in new and replica in self.reports:
                new[replica] = self.reports[replica]
        touched: set[str] = set()
        for replica in self.reports.keys() | new.keys():
            old_report = self.reports.get(replica)
            new_report = new.get(replica)
            if old_report is new_report or old_report == new_report:
                if old_report is not None:
                    new[replica] = old_report
                continue
            if old_report:
                self._remove(replica, old_report, touched)
            if new_report:
                for source, count in new_report.items():
                    touched.add(source)
                    self.by_source.setdefault(source, {})[replica] = count
        self.reports = new
        return touched

    def _remove(self, replica: str, report: Report, touched: set[str]) -> None:
        for source in report:
            touched.add(source)
            counts = self.by_source.get(source)
            if counts is not None:
                counts.pop(replica, None)
                if not counts:
                    del self.by_source[source]
