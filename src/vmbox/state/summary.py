"""The aggregator's summaries of a service's demand reports and resize acks, as values (pure).

Without them every replica watches every other replica's demand report and
ack: N writes per report interval become N^2 watch events, and each resize
N acks times N watchers. The service's aggregator (vmbox.state.aggregator, a
replica elected with its member lease) watches the N keys instead and
publishes one summary of each, which every replica watches: O(N) store
operations and O(N) watch events per interval or resize.

`demand`: the reports of the heaviest sources, replica -> source -> packets,
cut to at most `max_pairs` (replica, source) pairs, whole sources first by
total demand. Each replica divides from it with the same code as before
(vmbox.sharing), so every replica still computes the same shares, now from the
very same bytes. A source left out takes the even share at every replica,
which adds up to the limit as well: the cut costs accuracy, never safety.

`acks`: the member sets that every one of their members has acked, each with
the latest first window its members' acks declare (None when one does not
say). A replica turns it back into acks (`as_acks`) for its ResizeGuard,
which asks only whether every member of a set acked it and what they
declared: the synthesized acks answer both as the real ones did at the
summary's revision. Why that keeps the guard's proof: see
vmbox.state.epoch ("Acks through the aggregator").

The demand summary also names its tick: every window divides by the summary
of its tick, an interval before it begins (vmbox.sharing.window_tick), so replicas
that begin a window late, or take a summary late, still divide it alike
(vmbox.functions.fixedwindow). The aggregator writes that tick's summary even
when nothing changed, so a replica can tell "unchanged" from "not here yet".

Both carry the store revision of the snapshot they summarise (`rev`); a
replica takes a summary only if it is newer than the last it took, so two
aggregators for a moment (one that lost its lease and does not know yet)
never move it backwards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from vmbox.state.demand import Report, report_of
from vmbox.state.epoch import Ack

# (replica, source) pairs in one demand summary: ~25 bytes each, so at most ~100 KB
# (etcd refuses requests over 1.5 MiB), sent to every replica each interval it changes.
MAX_PAIRS = 4096


@dataclass(frozen=True, slots=True)
class DemandSummary:
    revision: int
    reports: dict[str, Report]
    tick: int | None = None  # the summary tick it was written for (vmbox.sharing.next_tick)


@dataclass(frozen=True, slots=True)
class AckSummary:
    revision: int
    complete: tuple[tuple[frozenset[str], int | None], ...]  # (set, latest declared window)


def heaviest(reports: Mapping[str, Mapping[str, int]], max_pairs: int) -> dict[str, Report]:
    """The reports cut to the heaviest sources, whole sources, at most `max_pairs` pairs.

    Sources are taken by their total over all reports, heaviest first (ties by
    name, so the cut does not depend on the order reports arrived in); a
    source whose pairs do not fit is skipped, a lighter one may still fit.
    """
    by_source: dict[str, dict[str, int]] = {}
    for replica, report in reports.items():
        for source, count in report.items():
            by_source.setdefault(source, {})[replica] = count
    pairs = sum(len(counts) for counts in by_source.values())
    if pairs <= max_pairs:
        return {replica: dict(report) for replica, report in reports.items() if report}
    order = sorted(by_source.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    kept: dict[str, Report] = {}
    room = max_pairs
    for source, counts in order:
        if len(counts) > room:
            continue
        room -= len(counts)
        for replica, count in counts.items():
            kept.setdefault(replica, {})[source] = count
        if room == 0:
            break
    return kept


def encode_demand(summary: DemandSummary) -> bytes:
    body: dict[str, object] = {"rev": summary.revision, "reports": _sorted(summary.reports)}
    if summary.tick is not None:
        body["tick"] = summary.tick
    return json.dumps(body, separators=(",", ":")).encode()


def parse_demand(raw: bytes) -> DemandSummary | None:
    """A stored demand summary, or None if it is not one (the replica keeps its last)."""
    data = _object(raw)
    if data is None:
        return None
    revision, bodies, tick = data.get("rev"), data.get("reports"), data.get("tick")
    if not isinstance(revision, int) or not _count(revision) or not isinstance(bodies, dict):
        return None
    if tick is not None and not (isinstance(tick, int) and _count(tick)):
        return None
    reports: dict[str, Report] = {}
    for replica, body in bodies.items():
        report = report_of(body)
        if report is None:
            return None
        reports[replica] = report
    return DemandSummary(revision, reports, tick)


def complete_sets(acks: Mapping[str, Ack]) -> tuple[tuple[frozenset[str], int | None], ...]:
    """The sets every one of whose members acked exactly that set, with the latest
    window their acks declare (None if one of them declares none); sorted.

    One pass that groups the replicas by the set they acked: a set is complete
    when its members are all among its ackers (each replica has one ack). Checking
    every member of every acked set instead costs N^2 set comparisons per look at
    a join of N replicas, which the aggregator makes at every ack.
    """
    ackers: dict[frozenset[str], list[str]] = {}
    for replica, ack in acks.items():
        ackers.setdefault(ack.members, []).append(replica)
    out = []
    for members, who in ackers.items():
        if not members or len(who) < len(members) or not members <= set(who):
            continue
        windows = [w for m in members if (w := acks[m].window) is not None]
        declared = max(windows) if len(windows) == len(members) else None
        out.append((members, declared))
    return tuple(sorted(out, key=lambda item: sorted(item[0])))


def encode_acks(summary: AckSummary) -> bytes:
    sets = [{"members": sorted(m), "window": w} for m, w in summary.complete]
    return json.dumps({"rev": summary.revision, "sets": sets}, separators=(",", ":")).encode()


def parse_acks(raw: bytes) -> AckSummary | None:
    """A stored ack summary, or None if it is not one."""
    data = _object(raw)
    if data is None:
        return None
    revision, sets = data.get("rev"), data.get("sets")
    if not isinstance(revision, int) or not _count(revision) or not isinstance(sets, list):
        return None
    complete = []
    for entry in sets:
        if not isinstance(entry, dict):
            return None
        members, window = entry.get("members"), entry.get("window")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            return None
        if window is not None and not _count(window):
            return None
        complete.append((frozenset(members), window))
    return AckSummary(revision, tuple(complete))


def as_acks(summary: AckSummary) -> tuple[dict[str, frozenset[str]], dict[str, int]]:
    """The acks and declared windows a ResizeGuard takes (`see_acks`), from a summary.

    A member of a complete set acks that set and declares the set's latest
    window (the guard takes the latest over the members anyway). A replica is
    in at most one complete set: each replica has one ack.
    """
    acks: dict[str, frozenset[str]] = {}
    windows: dict[str, int] = {}
    for members, window in summary.complete:
        for member in members:
            acks[member] = members
            if window is not None:
                windows[member] = window
    return acks, windows


def _sorted(reports: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    return {r: dict(sorted(reports[r].items())) for r in sorted(reports)}


def _object(raw: bytes) -> dict[str, object] | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
