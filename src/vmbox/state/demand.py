"""Demand reports for the `demand` split, as values: their format and who takes them (pure).

A report is what one replica says each source offered it in one report
interval: a JSON object of positive counts, the heaviest sources only,
sorted so equal reports are equal bytes (vmbox.state.demandsync writes and
watches them; a middlebox that is `DemandAware` counts and takes them).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Mapping
from operator import itemgetter
from typing import Protocol, runtime_checkable

Report = dict[str, int]  # source -> packets offered in one report interval


@runtime_checkable
class DemandAware(Protocol):
    """A middlebox that counts offered packets per source and takes the group's reports."""

    def take_demand(self) -> dict[str, int]: ...

    def set_demand(
        self, reports: Mapping[str, Mapping[str, int]], tick: int | None = None
    ) -> None: ...


def encode_report(offered: Mapping[str, int], max_sources: int) -> bytes:
    """The heaviest `max_sources` sources as compact JSON (sorted: equal reports, equal bytes)."""
    items = list(offered.items())
    if len(items) > max_sources:
        items = heapq.nlargest(max_sources, items, key=itemgetter(1))
    return json.dumps(dict(sorted(items)), separators=(",", ":")).encode()


def parse_report(raw: bytes) -> Report | None:
    """A stored report, or None if it is not a JSON object of positive counts."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return report_of(data)


def report_of(data: object) -> Report | None:
    """A decoded report (a JSON object of positive counts), or None."""
    if not isinstance(data, dict):
        return None
    report = {}
    for source, count in data.items():
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            return None
        report[source] = count
    return report
